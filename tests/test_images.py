
import pytest
from PIL import Image

from clipgram import images


def _save(path, img, **kw):
    img.save(path, **kw)
    return path


@pytest.fixture
def jpeg(tmp_path):
    return _save(tmp_path / "ok.jpg", Image.new("RGB", (64, 48), (200, 30, 30)), quality=90)


def test_verify_reports_format_and_size(jpeg):
    info = images.verify(jpeg)
    assert (info.format, info.width, info.height, info.extension) == ("JPEG", 64, 48, "jpg")


@pytest.mark.parametrize("make, reason", [
    (lambda good: b"", "empty file"),
    (lambda good: good[: len(good) // 2], "truncated"),
    (lambda good: good[:200] + bytes(range(256)) * 4, "corrupt"),
    (lambda good: b"<!doctype html><html><body>Please log in</body></html>", "not an image"),
    (lambda good: b"GIF89a" + b"\x00" * 3, "not an image|corrupt"),
])
def test_bad_bytes_are_refused_with_a_reason(tmp_path, jpeg, make, reason):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(make(jpeg.read_bytes()))
    with pytest.raises(images.BadImage, match=reason):
        images.verify(bad)


@pytest.mark.parametrize("pixels", [150, 1000])  # Pillow warns below 2x the limit, errors above
def test_decompression_bombs_are_refused(tmp_path, pixels):
    side = int(pixels ** 0.5) + 1
    path = _save(tmp_path / "bomb.png", Image.new("L", (side, side)))
    with pytest.raises(images.BadImage, match="decompression bomb"):
        images.verify(path, max_pixels=100)
    assert images.verify(path, max_pixels=10_000).width == side


def test_load_rgb_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = _save(tmp_path / "rot.jpg", img, exif=exif.tobytes())
    assert images.load_rgb(path).size == (20, 40)


@pytest.mark.parametrize("mode, color, kw, expected", [
    ("CMYK", (0, 255, 255, 0), {"format": "JPEG"}, (255, 0, 0)),
    ("RGBA", (0, 0, 0, 0), {"format": "PNG"}, (255, 255, 255)),     # transparent → white
    ("LA", (0, 255), {"format": "PNG"}, (0, 0, 0)),
    ("I;16", 65535, {"format": "PNG"}, (255, 255, 255)),
])
def test_load_rgb_converts_modes(tmp_path, mode, color, kw, expected):
    path = _save(tmp_path / f"img.{kw['format'].lower()}", Image.new(mode, (8, 8), color), **kw)
    img = images.load_rgb(path)
    assert img.mode == "RGB"
    assert all(abs(a - b) <= 3 for a, b in zip(img.getpixel((4, 4)), expected))


def test_load_rgb_palette_with_transparency(tmp_path):
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    img.info["transparency"] = 0
    path = _save(tmp_path / "p.png", img, transparency=0)
    assert images.load_rgb(path).getpixel((0, 0)) == (10, 200, 10)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    r, g, _ = images.load_rgb(path).getpixel((4, 4))
    assert r > 200 and g < 50


def test_animated_webp_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(0, 0, 255), (255, 255, 0)]]
    path = tmp_path / "anim.webp"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, lossless=True)
    assert images.verify(path).format == "WEBP"
    r, g, b = images.load_rgb(path).getpixel((4, 4))
    assert b > 200 and r < 50 and g < 50


@pytest.mark.parametrize("body, says", [
    (b"\n<!DOCTYPE html><html><head><title>Login</title></head></html>", "HTML page"),
    (b'{"message": "checkpoint_required", "status": "fail"}', "JSON"),
    (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>',
     "unsupported format"),
])
def test_not_images_say_what_they_look_like(tmp_path, body, says):
    path = tmp_path / "x.jpg"
    path.write_bytes(body)
    with pytest.raises(images.BadImage, match=f"not an image: .*{says}"):
        images.verify(path)


def _halves(size, first, second):
    """Left half `first`, right half `second`."""
    img = Image.new("RGB", size, second)
    img.paste(first, (0, 0, size[0] // 2, size[1]))
    return img


def test_min_side_decodes_a_jpeg_at_a_smaller_scale(tmp_path):
    path = _save(tmp_path / "big.jpg", _halves((1080, 1080), (255, 0, 0), (0, 0, 255)), quality=90)
    full, draft = images.load_rgb(path), images.load_rgb(path, min_side=448)
    assert full.size == (1080, 1080)
    assert draft.size == (540, 540)                        # 1/2: 1/4 would be 270 < 448
    assert images.load_rgb(path, min_side=224).size == (270, 270)
    assert images.load_rgb(path, min_side=100).size == (135, 135)  # libjpeg stops at 1/8
    # the same picture, not just fewer pixels
    assert full.resize(draft.size, Image.Resampling.BOX).getpixel((100, 270)) == pytest.approx(
        draft.getpixel((100, 270)), abs=4)
    assert images.verify(path).width == 1080               # download verification decodes in full


def test_min_side_keeps_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display: the stored left half ends up on top
    path = _save(tmp_path / "rot.jpg", _halves((1080, 540), (255, 0, 0), (0, 0, 255)),
                 exif=exif.tobytes(), quality=90)
    img = images.load_rgb(path, min_side=224)
    assert img.size == (270, 540)                          # 1/2 of 540×1080, upright
    top, bottom = img.getpixel((135, 60)), img.getpixel((135, 480))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


@pytest.mark.parametrize("name, img, kw, min_side", [
    ("big.png", Image.new("RGB", (1080, 1080), (10, 200, 10)), {}, 224),         # not a JPEG
    ("small.jpg", Image.new("RGB", (400, 300), (10, 200, 10)), {"quality": 90}, 224),  # 1/2 < 224
    ("tiny.jpg", Image.new("RGB", (64, 48), (10, 200, 10)), {"quality": 90}, 448),     # < min_side
])
def test_min_side_leaves_other_images_as_they_are(tmp_path, name, img, kw, min_side):
    path = _save(tmp_path / name, img, **kw)
    full, draft = images.load_rgb(path), images.load_rgb(path, min_side=min_side)
    assert draft.size == full.size == img.size
    assert draft.tobytes() == full.tobytes()


def test_min_side_converts_cmyk_jpegs(tmp_path):
    path = _save(tmp_path / "cmyk.jpg", Image.new("CMYK", (1080, 1080), (0, 255, 255, 0)), format="JPEG")
    img = images.load_rgb(path, min_side=224)
    assert (img.mode, img.size) == ("RGB", (270, 270))
    assert all(abs(a - b) <= 3 for a, b in zip(img.getpixel((135, 135)), (255, 0, 0)))


def test_min_side_keeps_the_guards(tmp_path, jpeg):
    big = _save(tmp_path / "bomb.jpg", Image.new("RGB", (1080, 1080)), quality=90)
    with pytest.raises(images.BadImage, match="decompression bomb"):
        images.load_rgb(big, max_pixels=10_000, min_side=64)   # the guard reads the full size
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(big.read_bytes()[:2000])
    with pytest.raises(images.BadImage, match="truncated"):
        images.load_rgb(truncated, min_side=224)
