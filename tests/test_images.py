"""Every common kind of image file loads as the right 8-bit RGB picture; a broken one is named, never half-read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from visiontune.data import images
from visiontune.data.images import MAX_PIXELS, BadImage, load_rgb, load_rgb_tensor


def pixel(path, xy=(0, 0)) -> tuple[int, int, int]:
    im = load_rgb(path)
    assert im.mode == "RGB"
    return im.getpixel(xy)


def test_grayscale_and_bilevel(tmp_path):
    Image.new("L", (8, 8), 128).save(tmp_path / "gray.png")
    Image.new("1", (8, 8), 1).save(tmp_path / "bilevel.png")
    Image.new("LA", (8, 8), (60, 255)).save(tmp_path / "gray_alpha.png")
    assert pixel(tmp_path / "gray.png") == (128, 128, 128)
    assert pixel(tmp_path / "bilevel.png") == (255, 255, 255)
    assert pixel(tmp_path / "gray_alpha.png") == (60, 60, 60)


def test_transparency_becomes_white_not_black(tmp_path):
    Image.new("RGBA", (8, 8), (200, 10, 10, 0)).save(tmp_path / "clear.png")
    Image.new("RGBA", (8, 8), (200, 10, 10, 255)).save(tmp_path / "opaque.png")
    pal = Image.new("P", (8, 8), 3)
    pal.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * 756)
    pal.save(tmp_path / "palette.png")
    pal.save(tmp_path / "palette_clear.png", transparency=3)
    assert pixel(tmp_path / "clear.png") == (255, 255, 255)
    assert pixel(tmp_path / "opaque.png") == (200, 10, 10)
    assert pixel(tmp_path / "palette.png") == (70, 80, 90)
    assert pixel(tmp_path / "palette_clear.png") == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(tmp_path / "white.jpg")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "red.jpg")
    assert all(v >= 250 for v in pixel(tmp_path / "white.jpg"))
    r, g, b = pixel(tmp_path / "red.jpg")
    assert r > 240 and g < 15 and b < 15


def test_16_bit_and_float_samples_are_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")  # Pillow opens it as I;16
    im = load_rgb(tmp_path / "g16.png")
    assert [im.getpixel((x, 0))[0] for x in range(4)] == [0, 100, 255, 4]
    Image.fromarray(np.full((4, 4), 200, dtype=np.uint16)).save(tmp_path / "dark16.png")
    assert pixel(tmp_path / "dark16.png") == (1, 1, 1)  # a dark 16-bit picture stays dark (200 of 65535)
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "float.tiff")
    im = load_rgb(tmp_path / "float.tiff")
    assert [im.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    Image.fromarray(np.array([[0, 20000, 65535]], dtype=np.int32), "I").save(tmp_path / "int32.tiff")
    assert [load_rgb(tmp_path / "int32.tiff").getpixel((x, 0))[0] for x in range(3)] == [0, 78, 255]


@pytest.mark.parametrize(
    "orientation, size, red_at",
    [
        (1, (40, 20), (0, 10)),  # as stored: red left half
        (3, (40, 20), (39, 10)),  # upside down: red on the right
        (6, (20, 40), (10, 0)),  # rotated 90 degrees clockwise to display: red on top
        (8, (20, 40), (10, 39)),  # rotated 90 degrees counter-clockwise: red at the bottom
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, size, red_at):
    a = np.zeros((20, 40, 3), dtype=np.uint8)
    a[:, :20] = (230, 20, 20)
    a[:, 20:] = (20, 20, 230)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    im = load_rgb(tmp_path / "photo.jpg")
    assert im.size == size
    r, g, b = im.getpixel(red_at)
    assert r > 180 and b < 80


def test_other_formats_and_a_jpeg_named_png(tmp_path):
    a = np.full((12, 12, 3), (10, 200, 30), dtype=np.uint8)
    for name in ("x.webp", "x.bmp", "x.tif"):
        Image.fromarray(a).save(tmp_path / name, **({"lossless": True} if name.endswith("webp") else {}))
        assert pixel(tmp_path / name) == (10, 200, 30)
    Image.fromarray(a).save(tmp_path / "really_a_jpeg.png", format="JPEG", quality=100)
    r, g, b = pixel(tmp_path / "really_a_jpeg.png")
    assert abs(r - 10) < 8 and abs(g - 200) < 8 and abs(b - 30) < 8


def test_bad_files_are_named(tmp_path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png")  # 81 megapixels in a few kilobytes
    (tmp_path / "folder.png").mkdir()
    for name, reason in [
        ("truncated.png", "corrupt or truncated"),
        ("empty.jpg", "not an image"),
        ("text.png", "not an image"),
        ("bomb.png", "decompression bomb"),
        ("folder.png", "directory"),
        ("missing.png", "no such file"),
    ]:
        with pytest.raises(BadImage) as e:
            load_rgb(tmp_path / name)
        assert name in str(e.value) and reason in str(e.value) and "\n" not in str(e.value)
    assert 9000 * 9000 > MAX_PIXELS


def test_tensors_hold_the_pixels_of_the_pil_image_and_plain_jpegs_skip_pil(tmp_path, monkeypatch):
    """``load_rgb_tensor`` decodes a plain RGB JPEG with torchvision's libjpeg (same pixels); every other file, a
    rotated or grayscale or CMYK JPEG, one decoded at reduced size, goes through PIL as ``load_rgb`` does."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "plain.jpg", quality=90)
    Image.fromarray(a).save(tmp_path / "rotated.jpg", exif=exif)
    Image.fromarray(a[..., 0]).save(tmp_path / "gray.jpg")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.fromarray(a).save(tmp_path / "photo.png")
    Image.fromarray(np.repeat(np.repeat(a, 4, 0), 4, 1)).save(tmp_path / "large.jpg")  # 192 x 256: reduced for 48
    calls = []
    monkeypatch.setattr(images, "decode_jpeg", lambda *a, **k: calls.append(1) or torchvision_decode(*a, **k))
    for name, short_side, fast in [
        ("plain.jpg", None, True),
        ("plain.jpg", 48, True),
        ("rotated.jpg", None, False),
        ("gray.jpg", None, False),
        ("cmyk.jpg", None, False),
        ("photo.png", None, False),
        ("large.jpg", 48, False),
    ]:
        calls.clear()
        got = load_rgb_tensor(tmp_path / name, short_side)
        assert got.dtype == torch.uint8 and torch.equal(got, pil_to_tensor(load_rgb(tmp_path / name, short_side))), name
        assert bool(calls) == fast, name
    assert load_rgb_tensor(tmp_path / "rotated.jpg").shape == (3, 64, 48)


def torchvision_decode(*args, **kwargs):
    from torchvision.io import decode_jpeg

    return decode_jpeg(*args, **kwargs)


def test_a_broken_jpeg_is_named_by_either_decoder(tmp_path):
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "header_only.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    for name in ("truncated.jpg", "header_only.jpg"):
        for load in (load_rgb, load_rgb_tensor):
            with pytest.raises(BadImage) as e:
                load(tmp_path / name)
            assert name in str(e.value) and "\n" not in str(e.value)
