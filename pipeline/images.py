"""Safe image decoding: the only way bytes from the internet reach a model."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
              "TIFF": "tif", "MPO": "jpg", "HEIF": "heic", "AVIF": "avif"}


class BadImage(ValueError):
    """The bytes are not an image a model can use; the message says why."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int

    @property
    def extension(self) -> str:
        return EXTENSIONS.get(self.format, self.format.lower())


def reason(e: BaseException) -> str:
    """An exception from a decoder as a failed row's reason: its type and message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _open(path: Path, max_pixels: int) -> Image.Image:
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's decompression-bomb guard
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise BadImage(f"not an image: {_sniff(path)}") from None
    except Exception as e:  # a plugin on hostile bytes may raise anything (struct.error, EOFError, …)
        raise BadImage(f"corrupt or truncated image header: {reason(e)}") from None


def _decode_error(img: Image.Image, e: Exception) -> BadImage:
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return BadImage(f"decompression bomb: {e}")  # e.g. a GIF frame or PNG chunk larger than the header
    return BadImage(f"corrupt or truncated {img.format or 'image'}: {reason(e)}")


def _sniff(path: Path) -> str:
    """What the bytes look like, for the error message."""
    with open(path, "rb") as f:
        head = f.read(512).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head:
        return "an HTML page (a login wall or an error page?)"
    if head.startswith((b"{", b"[")):
        return "JSON (an API error?)"
    return "unrecognised or unsupported format"


def verify(path: Path, max_pixels: int = 89_478_485) -> ImageInfo:
    """Fully decode the image at `path` and convert it as the models will; raise BadImage saying
    what is wrong. An image that verifies is one every later stage can decode."""
    if path.stat().st_size == 0:
        raise BadImage("empty file (0 bytes)")
    with _open(path, max_pixels) as img:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.load()  # decodes every pixel: truncated or corrupt data fails here
                to_rgb(upright(img))  # what load_rgb does, so what verifies, loads
        except Exception as e:
            raise _decode_error(img, e) from None
        return ImageInfo(img.format or "unknown", img.width, img.height)


def exif_orientation(source: Path | BinaryIO) -> int:
    """The EXIF orientation tag of an image file or its bytes (1: as stored); reads the header only."""
    try:
        with Image.open(source) as img:
            return int(img.getexif().get(0x0112, 1))
    except Exception:
        return 1  # unreadable headers fail where the image is decoded, with the reason


def load_rgb(path: Path, max_pixels: int = 89_478_485, min_side: int | None = None) -> Image.Image:
    """Decode to an RGB image the way a model should see it.

    EXIF orientation is applied; palette, CMYK, LAB, 16-bit, 32-bit, float and alpha
    images become plain RGB (alpha composited on white); animations and multi-page
    files give their first frame. With `min_side`, a JPEG may come out smaller:
    libjpeg scales it by 1/2, 1/4 or 1/8 while decoding (in the DCT domain, a
    fraction of a full decode's work), as far as both sides stay at least
    `min_side`. Other formats ignore it.
    """
    with _open(path, max_pixels) as src:
        try:
            if min_side:
                # before anything loads pixels; the mode stays (None), only the scale changes
                src.draft(None, (min_side, min_side))
            rgb = to_rgb(upright(src))
            return rgb if rgb is not src else rgb.copy()  # a copy: safe to close the file
        except Exception as e:
            raise _decode_error(src, e) from None


def upright(img: Image.Image) -> Image.Image:
    """`img` turned as its EXIF orientation says; as stored when its EXIF cannot be read."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # garbage EXIF in a good image: the orientation is unknown, not the pixels
        return img


_SRGB = ImageCms.createProfile("sRGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB, whatever its mode."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "La":  # premultiplied grey + alpha: Pillow converts it only to LA
        img, mode = img.convert("LA"), "LA"
    if mode in ("RGBA", "LA", "PA", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "LAB":  # Pillow's convert() has no LAB → RGB
        return ImageCms.applyTransform(img, _LAB_TO_SRGB)
    if mode == "CMYK" and img.info.get("icc_profile"):
        try:  # the file's own profile says what its inks look like
            source = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
            return ImageCms.profileToProfile(img, source, _SRGB, outputMode="RGB")
        except Exception:  # a broken or non-CMYK profile: Pillow's naive conversion instead
            pass
    if mode in ("I", "F") or mode.startswith(("I;", "F;")):
        return _scaled_to_8bit(img).convert("RGB")
    return img.convert("RGB")


_LAB_TO_SRGB = ImageCms.buildTransform(ImageCms.createProfile("LAB"), _SRGB, "LAB", "RGB")


def _scaled_to_8bit(img: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float image as 8-bit grey: unsigned 16-bit scaled by its range,
    values already in 0..1 or 0..255 kept, anything else stretched from its minimum to maximum."""
    pixels = np.asarray(img)
    values = pixels.astype(np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if pixels.dtype.kind == "u" and pixels.dtype.itemsize == 2:
        values = values / 257.0
    elif pixels.dtype.kind == "f" and low >= 0.0 and high <= 1.0:
        values = values * 255.0
    elif not (low >= 0.0 and high <= 255.0):
        values = (values - low) * (255.0 / (high - low)) if high > low else values * 0.0
    values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
