"""Safe image decoding: the only way bytes from the internet reach a model."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

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
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"corrupt or truncated image header: {e}") from None


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
    """Fully decode the image at `path`; raise BadImage saying what is wrong."""
    if path.stat().st_size == 0:
        raise BadImage("empty file (0 bytes)")
    with _open(path, max_pixels) as img:
        try:
            img.load()  # decodes every pixel: truncated or corrupt data fails here
        except (OSError, SyntaxError, ValueError) as e:
            raise BadImage(f"corrupt or truncated {img.format or 'image'}: {e}") from None
        return ImageInfo(img.format or "unknown", img.width, img.height)


def exif_orientation(source: Path | BinaryIO) -> int:
    """The EXIF orientation tag of an image file or its bytes (1: as stored); reads the header only."""
    try:
        with Image.open(source) as img:
            return int(img.getexif().get(0x0112, 1))
    except (OSError, SyntaxError, ValueError):
        return 1  # unreadable headers fail where the image is decoded, with the reason


def load_rgb(path: Path, max_pixels: int = 89_478_485, min_side: int | None = None) -> Image.Image:
    """Decode to an RGB image the way a model should see it.

    EXIF orientation is applied; palette, CMYK, 16-bit and alpha images become
    plain RGB (alpha composited on white); animations give their first frame.
    With `min_side`, a JPEG may come out smaller: libjpeg scales it by 1/2, 1/4
    or 1/8 while decoding (in the DCT domain, a fraction of a full decode's work),
    as far as both sides stay at least `min_side`. Other formats ignore it.
    """
    with _open(path, max_pixels) as src:
        try:
            if min_side:
                # before anything loads pixels; the mode stays (None), only the scale changes
                src.draft(None, (min_side, min_side))
            return _to_rgb(ImageOps.exif_transpose(src))  # a copy: safe to close the file
        except (OSError, SyntaxError, ValueError) as e:
            raise BadImage(f"cannot decode {path.name}: {e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v * (1 / 256)).convert("L")  # 16-bit → 8-bit, not clipped
    return img.convert("RGB")
