"""Image conversion for shards: odd modes become correct RGB, valid JPEG/PNG keep their bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from helpers import data as D
from vlm_core.data.images import ImageReject, check_image, join_under_root


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_rgb_jpeg_and_png_keep_original_bytes():
    jpg = D.jpeg(30, 20, seed=1)
    out = check_image(jpg, "a.jpg", 10**6)
    assert out.data == jpg and out.ext == "jpg" and (out.width, out.height) == (30, 20) and not out.converted
    png = D.png(Image.new("RGB", (5, 7), (1, 2, 3)))
    out = check_image(png, "a.png", 10**6)
    assert out.data == png and out.ext == "png"


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    img.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent blue -> white
    img.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black -> mid grey
    out = check_image(D.png(img), "a.png", 10**6)
    rgb = _decode(out.data)
    assert out.converted and out.ext == "png" and rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((2, 2)) == (255, 0, 0)
    assert all(126 <= c <= 128 for c in rgb.getpixel((1, 0)))


def test_palette_grey_and_cmyk_become_rgb():
    arr = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    pal = Image.fromarray(arr, "RGB").quantize(16)
    out = _decode(check_image(D.png(pal), "p.png", 10**6).data)
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(pal.convert("RGB")))
    grey = Image.fromarray(arr[..., 0], "L")
    out = _decode(check_image(D.png(grey), "g.png", 10**6).data)
    assert np.array_equal(np.asarray(out), np.stack([arr[..., 0]] * 3, axis=-1))
    cmyk = D.jpeg(16, 16, seed=3, mode="CMYK")
    res = check_image(cmyk, "c.jpg", 10**6)
    ref = _decode(cmyk).convert("RGB")
    assert res.converted and np.array_equal(np.asarray(_decode(res.data)), np.asarray(ref))
    grey16 = Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
    assert grey16.mode.startswith("I")
    out = _decode(check_image(D.png(grey16), "g16.png", 10**6).data)
    assert np.array_equal(np.asarray(out)[..., 0], arr[..., 0])


def test_exif_orientation_is_applied():
    base = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 40, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    base.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    out = check_image(buf.getvalue(), "r.jpg", 10**6)
    assert out.converted and (out.width, out.height) == (20, 40) == _decode(out.data).size


@pytest.mark.parametrize("rel", ["../x.jpg", "a/../../x.jpg", "/abs.jpg", "s3://b/x.jpg", "C:/x.jpg"])
def test_paths_must_stay_under_root(rel):
    with pytest.raises(ImageReject) as e:
        join_under_root("/data/root", rel)
    assert e.value.reason == "path_escapes_root"


@pytest.mark.parametrize("rel", ["", "  "])
def test_an_empty_path_has_its_own_reason(rel):
    with pytest.raises(ImageReject) as e:
        join_under_root("/data/root", rel)
    assert e.value.reason == "empty_image_path"


def test_inner_dotdot_that_stays_inside_is_fine():
    assert join_under_root("s3://bucket/root/", "a/../b.jpg") == "s3://bucket/root/b.jpg"
