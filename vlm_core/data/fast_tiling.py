"""The `torch` resize backend: InternVL's tiles within 2 grey levels of the PIL-exact ones, several times faster.

`vlm_core.data.tiling` reproduces InternVL's preprocessing bit for bit with PIL: decode at full size,
bicubic-resize the image to the grid's canvas and again to the thumbnail, then normalise in float32
step by step. On photos up to 4000x3000 px most of that time is PIL's resize (single-threaded scalar
code), then normalising, then decoding. This backend keeps the grid choice, the tile order and the
thumbnail rule (`closest_grid`, shared with tiling.py) and changes only how the pixels are computed:

- resize: `torch.nn.functional.interpolate(mode="bicubic", antialias=True)` on the uint8 image. On CPU
  that runs PyTorch's uint8 kernel ported from Pillow-SIMD: the same separable antialiased bicubic
  filter as PIL (a = -0.5, support scaled with the reduction), vectorised. It differs from PIL only in
  rounding (at most 1 grey level when scaling down, 2 when scaling up, on photos).
- decode: a JPEG much larger than everything it is resized to is decoded with PIL's draft mode
  (libjpeg's DCT scaling by 1/2, 1/4 or 1/8), but only when the reduced image is still at least
  `DRAFT_MARGIN` times the canvas in both directions, so the bicubic reduction that follows averages
  away what the DCT scaling changes. The grid is chosen from the full size, as training always does.
- thumbnail: resized from the original (or drafted) image, as InternVL does; resizing it from the
  canvas instead would be cheaper but sends the pixels through two low-pass filters.
- normalise: one uint8 → float32 conversion written straight into the output tile layout, then
  x · 1/(255·std) − mean/std (two passes, instead of five in tiling.py's torchvision-like steps).

Threads: interpolate uses PyTorch's intra-op threads. Inside DataLoader workers PyTorch sets one thread
per worker (the workers are the parallelism), which is also what makes it safe to use after fork.
`tests/test_fast_tiling.py` bounds the difference from the PIL path on photo-like images of many
sizes and aspect ratios; `benchmarks/preprocess_bench.py` measures the speed.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from vlm_core.data.tiling import NORMALIZATION, VisionGeometry, closest_grid, tile_budget

# JPEG draft only when the reduced image is still ≥ this × the canvas in both directions: at 1x the DCT
# scaling shows through by up to 71 grey levels on photo-like images, at 2x by up to 5, at 3x by at most 2.
DRAFT_MARGIN = 3.0
EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _scale_bias(normalization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / 255 − mean) / std as x · scale + bias, per channel, shaped (3, 1, 1)."""
    if normalization not in NORMALIZATION:
        raise ValueError(f"data.normalization={normalization!r}: must be one of {', '.join(NORMALIZATION)}")
    mean, std = (torch.tensor(v, dtype=torch.float64) for v in NORMALIZATION[normalization])
    return (1 / (255 * std)).float()[:, None, None], (-mean / std).float()[:, None, None]


def decode_for_grid(
    data: bytes, name: str, tile_size: int, min_tiles: int, max_tiles: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode upright RGB as a uint8 (3, H, W) tensor, and the (cols, rows) grid of its full upright size.

    A JPEG is decoded at a reduced scale when that still leaves DRAFT_MARGIN × the canvas (see module doc).
    """
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        if orientation in _TRANSPOSED:
            width, height = height, width
        cols, rows = closest_grid(width, height, tile_size, min_tiles, max_tiles)
        if image.format == "JPEG":
            need = (int(cols * tile_size * DRAFT_MARGIN), int(rows * tile_size * DRAFT_MARGIN))
            image.draft("RGB", need[::-1] if orientation in _TRANSPOSED else need)
        ImageOps.exif_transpose(image, in_place=True)
        if image.mode != "RGB":
            image = image.convert("RGB")
        array = np.asarray(image)
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ValueError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from None
    with warnings.catch_warnings():  # read-only array: we never write to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).permute(2, 0, 1), (cols, rows)


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
    decoded = [decode_for_grid(data, name, s, low, budget) for data, name in zip(images, names, strict=True)]
    counts = [c * r + (1 if use_thumbnail and c * r > 1 else 0) for _, (c, r) in decoded]
    out = torch.empty(sum(counts), 3, s, s)
    start = 0
    for (image, grid), n in zip(decoded, counts, strict=True):
        write_tiles(image, grid, s, use_thumbnail, out[start : start + n], scale, bias)
        start += n
    return out, counts
