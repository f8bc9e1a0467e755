"""The `torch` resize backend: InternVL's tiles within 2 grey levels of the PIL-exact ones, several times faster.

`vlm_core.data.tiling` reproduces InternVL's preprocessing bit for bit with PIL: decode at full size,
bicubic-resize the image to the grid's canvas and again to the thumbnail, then normalise in float32
step by step. On photos up to 4000x3000 px most of that time is PIL's resize (single-threaded scalar
code), then normalising, then decoding. This backend keeps the grid choice, the tile order and the
thumbnail rule (`closest_grid`, shared with tiling.py) and changes only how the pixels are computed:

- resize: `torch.nn.functional.interpolate(mode="bicubic", antialias=True)` on the uint8 image. On CPU
  that runs PyTorch's uint8 kernel ported from Pillow-SIMD: the same separable antialiased bicubic
  filter as PIL (a = -0.5, support scaled with the reduction, horizontal pass first, uint8 in
  between), vectorised. It differs from PIL only in fixed-point rounding: at most 1 grey level where
  a photo is scaled down, 2 where it is scaled up; the one exception seen is a value next to a hard
  edge where bicubic ringing is clipped at black (3 levels, 1 value in a sweep of 135 photo/geometry
  cases, ~20 M values; tests/test_fast_tiling.py pins it).
- thumbnail: resized from the original image, as InternVL does; resizing it from the canvas instead
  would be cheaper but sends the pixels through two low-pass filters.
- decode: full size, as PIL's path. JPEG draft decoding (libjpeg's DCT scaling by 1/2, 1/4, 1/8) is not
  used: the scaled decode skips the chroma upsampling of 4:2:0 JPEGs, so colour edges move by up to 32
  grey levels in the final tiles even when the reduced image is still 3x the canvas (13 at 6x).
- normalise: one uint8 → float32 conversion written straight into the output tile layout, then
  x · 1/(255·std) − mean/std (two passes, instead of five in tiling.py's torchvision-like steps).

Threads: interpolate uses PyTorch's intra-op threads. Inside DataLoader workers PyTorch sets one thread
per worker (the workers are the parallelism), which is also what makes it safe to use after fork.
`tests/test_fast_tiling.py` bounds the difference from the PIL path on photo-like images of many
sizes and aspect ratios; `benchmarks/preprocess_bench.py` measures the speed.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from vlm_core.data.tiling import NORMALIZATION, VisionGeometry, closest_grid, open_rgb, tile_budget


def _scale_bias(normalization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / 255 − mean) / std as x · scale + bias, per channel, shaped (3, 1, 1)."""
    if normalization not in NORMALIZATION:
        raise ValueError(f"data.normalization={normalization!r}: must be one of {', '.join(NORMALIZATION)}")
    mean, std = (torch.tensor(v, dtype=torch.float64) for v in NORMALIZATION[normalization])
    return (1 / (255 * std)).float()[:, None, None], (-mean / std).float()[:, None, None]


def decode(data: bytes, name: str) -> torch.Tensor:
    """Upright RGB as a uint8 (3, H, W) tensor (a view of the decoded HWC array); errors name the image."""
    array = np.asarray(open_rgb(data, name))
    with warnings.catch_warnings():  # a read-only array: nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).permute(2, 0, 1)


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (3, h, w) → uint8 (3, height, width), antialiased bicubic (PIL's filter)."""
    if tuple(image.shape[1:]) == (height, width):
        return image
    return F.interpolate(image[None], size=(height, width), mode="bicubic", antialias=True)[0]


def write_tiles(
    image: torch.Tensor, grid: tuple[int, int], tile_size: int, use_thumbnail: bool, out: torch.Tensor,
    scale: torch.Tensor, bias: torch.Tensor,
) -> None:
    """Resize `image` to the grid's canvas, cut it row by row (thumbnail last) and normalise into `out`.

    `out` is float32 (n, 3, S, S) with n = cols·rows (+1 for the thumbnail when the grid has 2+ tiles).
    """
    cols, rows = grid
    s = tile_size
    canvas = _resize(image, rows * s, cols * s)
    tiles = canvas.unflatten(1, (rows, s)).unflatten(3, (cols, s)).permute(1, 3, 0, 2, 4)  # rows, cols, 3, S, S
    grid_out = out[: rows * cols].view(rows, cols, 3, s, s)
    grid_out.copy_(tiles)
    if use_thumbnail and rows * cols > 1:
        out[rows * cols].copy_(_resize(image, s, s))
    out.mul_(scale).add_(bias)


def fast_pixel_values(
    images: list[bytes],
    names: list[str],
    geometry: VisionGeometry,
    min_tiles: int,
    max_tiles: int,
    use_thumbnail: bool,
    normalization: str = "imagenet",
) -> tuple[torch.Tensor, list[int]]:
    """`tiling.image_pixel_values` for encoded images: the same tiles, counts and budget split, torch backend.

    Raises ValueError naming the image when one cannot be decoded.
    """
    scale, bias = _scale_bias(normalization)
    budget = tile_budget(max_tiles, len(images))
    low = min(min_tiles, budget)
    s = geometry.tile_size
    decoded = []
    for data, name in zip(images, names, strict=True):
        image = decode(data, name)
        decoded.append((image, closest_grid(image.shape[2], image.shape[1], s, low, budget)))
    counts = [c * r + (1 if use_thumbnail and c * r > 1 else 0) for _, (c, r) in decoded]
    out = torch.empty(sum(counts), 3, s, s)
    start = 0
    for (image, grid), n in zip(decoded, counts, strict=True):
        write_tiles(image, grid, s, use_thumbnail, out[start : start + n], scale, bias)
        start += n
    return out, counts
