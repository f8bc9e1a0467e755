"""The torch resize backend against the PIL-exact one: same tile counts and order, pixels within 2 grey levels on
photo-like images of many sizes (tiny, extreme aspect ratios), EXIF orientation, odd modes, errors, and DataLoader
workers (one intra-op thread each)."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.images import photo_jpeg
from vlm_core.config import DataConfig
from vlm_core.data.fast_tiling import fast_pixel_values
from vlm_core.data.preprocess import make_preprocessor
from vlm_core.data.sample import Turn
from vlm_core.data.template import SampleRejected
from vlm_core.data.tiling import NORMALIZATION, VisionGeometry, image_pixel_values, num_tiles, open_rgb

INTERNVL = VisionGeometry(tile_size=448, tokens_per_tile=256)
TINY = VisionGeometry(tile_size=112, tokens_per_tile=16)
# (width, height): phone photos both ways, tiny, square, panoramas and strips up to 150:1, odd sizes
SIZES = [(4000, 3000), (3000, 4000), (1920, 1080), (1024, 768), (640, 480), (320, 240), (1200, 1200),
         (4000, 400), (300, 3000), (2000, 50), (37, 91), (91, 37), (8, 8), (1, 1), (2, 300), (449, 447),
         (897, 449), (5, 200), (798, 1958), (1519, 1550)]
photo = functools.lru_cache(maxsize=None)(photo_jpeg)


def grey_levels(a: torch.Tensor, b: torch.Tensor, normalization: str = "imagenet", reduce: bool = True):
    """|a − b| on the 0..255 scale: the largest (a float), or per value (a tensor) when not `reduce`."""
    std = torch.tensor(NORMALIZATION[normalization][1])[None, :, None, None]
    grey = ((a - b) * std * 255).abs()
    return grey.max().item() if reduce else grey


def both(data: list[bytes], geometry: VisionGeometry, max_tiles: int, min_tiles: int = 1,
         normalization: str = "imagenet") -> tuple[tuple[torch.Tensor, list[int]], tuple[torch.Tensor, list[int]]]:
    pil = image_pixel_values([open_rgb(d) for d in data], geometry, min_tiles, max_tiles, True, normalization)
    fast = fast_pixel_values(data, [f"image {k}" for k in range(len(data))], geometry, min_tiles, max_tiles, True,
                             normalization)
    return pil, fast


@pytest.mark.parametrize(("geometry", "max_tiles"), [(INTERNVL, 12), (TINY, 6), (TINY, 1)])
def test_photos_within_two_grey_levels_of_pil(geometry, max_tiles):
    worst, over_two = {}, 0
    for k, (w, h) in enumerate(SIZES):
        (pil, pil_counts), (fast, fast_counts) = both([photo(w, h, seed=k)], geometry, max_tiles)
        assert fast_counts == pil_counts == [num_tiles(w, h, geometry.tile_size, 1, max_tiles, True)], (w, h)
        assert fast.shape == pil.shape and fast.dtype == torch.float32
        grey = grey_levels(fast, pil, reduce=False)
        worst[(w, h)] = grey.max().item()
        over_two += int((grey > 2 + 1e-3).sum())
    assert max(worst.values()) <= 2 + 1e-3 and over_two == 0, (worst, over_two)
    assert max(worst.values()) > 0.5  # another kernel, not the same code: the comparison is not vacuous


def test_the_one_exception_seen_ringing_clipped_at_black():
    # In a sweep of 135 photo/geometry cases, one value went past 2 grey levels: next to a dark object's hard
    # edge, where bicubic ringing undershoots and both filters clip at 0 after rounding their fixed-point
    # sums differently (PIL 3, torch 0). This pins it, so a change in either library that widens it shows.
    (pil, _), (fast, _) = both([photo(798, 1958, seed=8)], TINY, 1)
    grey = grey_levels(fast, pil, reduce=False)
    assert grey.max().item() <= 3 + 1e-3 and int((grey > 2 + 1e-3).sum()) <= 1 and int((grey > 1 + 1e-3).sum()) <= 2


def test_tiles_row_major_then_thumbnail():
    tile = 16
    colours = [(10 * k, 255 - 10 * k, 3 * k) for k in range(6)]
    arr = np.zeros((tile * 2, tile * 3, 3), dtype=np.uint8)  # 3 columns, 2 rows
    for k, colour in enumerate(colours):
        row, col = divmod(k, 3)
        arr[row * tile:(row + 1) * tile, col * tile:(col + 1) * tile] = colour
    png = io.BytesIO()
    Image.fromarray(arr).save(png, format="PNG")
    (pil, _), (fast, counts) = both([png.getvalue()], VisionGeometry(tile, 4), 6, normalization="siglip")
    assert counts == [7]
    for k, colour in enumerate(colours):  # siglip: x/127.5 - 1
        expected = torch.tensor(colour, dtype=torch.float32)[:, None, None] / 127.5 - 1
        assert torch.allclose(fast[k], expected.expand(3, tile, tile), atol=1e-5), k
    assert grey_levels(fast, pil, "siglip") <= 2 + 1e-3


@pytest.mark.parametrize("normalization", sorted(NORMALIZATION))
def test_no_resize_gives_the_pil_path_values(normalization):
    # an image of exactly one tile is not resized: only the fused normalisation differs (float rounding)
    rng = np.random.default_rng(0)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(png, format="PNG")
    (pil, _), (fast, _) = both([png.getvalue()], TINY, 6, normalization=normalization)
    assert fast.shape == (1, 3, 112, 112) and torch.allclose(fast, pil, atol=1e-5)


def test_multi_image_budget_split_and_min_tiles():
    data = [photo(1200, 300, seed=3), photo(300, 500, seed=4), photo(64, 64, seed=5)]
    for max_tiles, min_tiles in [(12, 1), (12, 3), (2, 2)]:
        (pil, pil_counts), (fast, fast_counts) = both(data, TINY, max_tiles, min_tiles)
        assert fast_counts == pil_counts and fast.shape == pil.shape, (max_tiles, min_tiles)
        assert grey_levels(fast, pil) <= 2 + 1e-3


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_grey_and_cmyk(orientation):
    upright = Image.open(io.BytesIO(photo(1500, 700, seed=orientation)))
    stored = upright.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                                8: Image.Transpose.ROTATE_270}[orientation])
    exif = stored.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    (pil, pil_counts), (fast, fast_counts) = both([buf.getvalue()], TINY, 6)
    assert fast_counts == pil_counts == [3] and grey_levels(fast, pil) <= 2 + 1e-3  # 2x1 grid of the upright image
    for mode in ("L", "CMYK"):
        buf = io.BytesIO()
        upright.convert(mode).save(buf, "JPEG", quality=95)
        (pil, _), (fast, _) = both([buf.getvalue()], TINY, 6)
        assert grey_levels(fast, pil) <= 2 + 1e-3, mode


def test_preprocessor_backends_and_errors(tokenizer, tiny_config):
    turns = [Turn(from_="human", value="<image>\nWhat is it?"), Turn(from_="gpt", value="A photo.")]
    image = photo(900, 500, seed=6)
    samples = {}
    for backend in ("torch", "pil"):
        pp = make_preprocessor(tokenizer, DataConfig(max_dynamic_patch=4, resize_backend=backend), tiny_config)
        assert pp.settings.resize_backend == backend
        samples[backend] = pp(turns, [image], "s")
        with pytest.raises(SampleRejected, match="s image 0: cannot decode image") as e:
            pp(turns, [b"not an image"], "s")
        assert e.value.reason == "invalid"
    assert DataConfig().resize_backend == "torch"
    torch_sample, pil_sample = samples["torch"], samples["pil"]
    assert torch.equal(torch_sample.input_ids, pil_sample.input_ids)
    assert torch_sample.tiles_per_image == pil_sample.tiles_per_image == [3]
    assert grey_levels(torch_sample.pixel_values, pil_sample.pixel_values) <= 2 + 1e-3
    assert pil_sample.pixel_values.equal(image_pixel_values([open_rgb(image)], TINY, 1, 4, True)[0])


class _Images(torch.utils.data.Dataset):
    def __init__(self, data: list[bytes]):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        pixels, _ = fast_pixel_values([self.data[i]], [f"image {i}"], TINY, 1, 6, True)
        return pixels, torch.get_num_threads()


def test_dataloader_workers_use_one_thread_and_give_the_same_tiles():
    data = [photo(w, h, seed=w) for w, h in [(800, 600), (300, 900), (1000, 1000), (640, 200)]]
    main = [fast_pixel_values([d], ["x"], TINY, 1, 6, True)[0] for d in data]  # warms the intra-op thread pool
    loader = torch.utils.data.DataLoader(_Images(data), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    got = list(loader)
    assert [threads for _, threads in got] == [1] * len(data)
    assert all(torch.equal(pixels, expected) for (pixels, _), expected in zip(got, main, strict=True))
