"""InternVL's dynamic-resolution tiling, without torchvision.

InternVL (1.5 and later) does not squash an image into one square: it picks a grid of (cols, rows)
square tiles whose aspect ratio is closest to the image's, resizes the image to exactly that grid,
cuts it into tiles row by row, and (optionally) appends a thumbnail of the whole image. The model
sees each tile as a separate image. This module reproduces that algorithm exactly (including its
tie rule and the order in which it tries grids) so a model fine-tuned here sees what it sees at
inference, and it takes the tile size and tokens per tile from the model's config instead of
assuming InternVL's 448 px / 256 tokens.

What is hand-written and why: the grid choice is InternVL's own few lines; cutting tiles is a numpy
reshape of the resized image instead of one PIL crop per tile (same pixels, one copy); resizing is
PIL's bicubic; normalisation is the same float32 operations as torchvision's ToTensor + Normalize
(divide by 255, subtract mean, divide by std). transformers' GotOcr2ImageProcessorPil (no
torchvision needed) has the same rule and gives the same tiles bit for bit when min_dynamic_patch
is 1, but it orders grids of equal tile count differently, so with min_dynamic_patch > 1 some exact
ties go the other way (1,896 of 312 M size/setting cases up to 2000 px; e.g. 1000x400 px with 4..4
tiles: InternVL 4x1, GotOcr2 2x2), and importing it adds ~2 s of transformers to every data worker.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

# Mean/std pairs selectable with data.normalization (CLIP and SigLIP constants as InternVL lists them).
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.4814546, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


@dataclass(frozen=True)
class VisionGeometry:
    """Tile size in pixels and language tokens per tile, as the model's config defines them."""

    tile_size: int
    tokens_per_tile: int


def _side(value: Any, name: str) -> int:
    """An int from a config value that may be an int or a [height, width] pair (square only)."""
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ValueError(f"model config {name}={value}: only square tiles are supported")
        value = value[0]
    return int(value)


def vision_geometry(model_config: Any) -> VisionGeometry:
    """Tile size and tokens per tile from an InternVLConfig (or its config.json as a dict).

    tokens per tile = (image_size / patch_size)² · downsample_ratio² (pixel shuffle), e.g. 448 px,
    14 px patches, 0.5 → 256. Raises when the config's own image_seq_length disagrees.
    """
    get = (lambda obj, key: obj.get(key)) if isinstance(model_config, dict) else getattr
    vision = get(model_config, "vision_config")
    tile = _side(get(vision, "image_size"), "vision_config.image_size")
    patch = _side(get(vision, "patch_size"), "vision_config.patch_size")
    ratio = float(get(model_config, "downsample_ratio"))
    if tile % patch:
        raise ValueError(f"model config: vision_config.image_size {tile} is not a multiple of patch_size {patch}")
    tokens = int(round((tile // patch) ** 2 * ratio**2))
    declared = get(model_config, "image_seq_length") if isinstance(model_config, dict) else getattr(
        model_config, "image_seq_length", None
    )
    if declared is not None and int(declared) != tokens:
        raise ValueError(
            f"model config: image_seq_length={declared} but (image_size/patch_size)^2 * downsample_ratio^2 "
            f"= {tokens}; the checkpoint's config is inconsistent"
        )
    return VisionGeometry(tile_size=tile, tokens_per_tile=tokens)


def tile_budget(max_tiles: int, n_images: int) -> int:
    """Tiles allowed per image when a sample has `n_images` images: max(1, max_tiles // n_images)."""
    return max(1, max_tiles // max(1, n_images))


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """All (cols, rows) with min_tiles ≤ cols·rows ≤ max_tiles, in InternVL's order (by tile count).

    Built exactly as upstream (a set sorted by area): among grids with the same tile count the order
    is CPython's set order for small int tuples, which is deterministic, and it decides the rare
    exact ties between such grids, so we keep it to match upstream bit for bit.
    """
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, tile_size: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """The (cols, rows) grid whose aspect ratio is closest to width/height, with InternVL's tie rule.

    Tie rule: a later (larger) grid with the same distance replaces the current one only when the
    image's area exceeds half the grid's pixel area, 0.5 · tile² · cols · rows. No candidate
    (min_tiles > max_tiles) gives (1, 1), as upstream.
    """
    aspect = width / height
    area = width * height
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, tile_size: int, min_tiles: int, max_tiles: int, use_thumbnail: bool) -> int:
    """How many tiles an image of this size becomes (without decoding it)."""
    cols, rows = closest_grid(width, height, tile_size, min_tiles, max_tiles)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n


def tile_image(
    image: Image.Image, tile_size: int, min_tiles: int, max_tiles: int, use_thumbnail: bool
) -> np.ndarray:
    """Cut an RGB image into tiles: uint8 array (n_tiles, tile, tile, 3), row-major, thumbnail last."""
    cols, rows = closest_grid(image.width, image.height, tile_size, min_tiles, max_tiles)
    resized = image.resize((tile_size * cols, tile_size * rows), Image.Resampling.BICUBIC)
    grid = np.asarray(resized, dtype=np.uint8).reshape(rows, tile_size, cols, tile_size, 3)
    tiles = grid.transpose(0, 2, 1, 3, 4).reshape(rows * cols, tile_size, tile_size, 3)
    if use_thumbnail and rows * cols > 1:
        thumb = np.asarray(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC), dtype=np.uint8)
        tiles = np.concatenate([tiles, thumb[None]], axis=0)
    return tiles


def normalize_tiles(tiles: np.ndarray, normalization: str = "imagenet") -> torch.Tensor:
    """uint8 (n, H, W, 3) → float32 (n, 3, H, W): /255, − mean, / std (torchvision's operations)."""
    if normalization not in NORMALIZATION:
        raise ValueError(f"data.normalization={normalization!r}: must be one of {', '.join(NORMALIZATION)}")
    mean, std = NORMALIZATION[normalization]
    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float().div_(255)
    return x.sub_(torch.tensor(mean)[:, None, None]).div_(torch.tensor(std)[:, None, None])


def open_rgb(data: bytes, name: str = "image") -> Image.Image:
    """Decode image bytes to RGB, applying the EXIF orientation (shard records store oriented sizes)."""
    try:
        image = Image.open(io.BytesIO(data))
        ImageOps.exif_transpose(image, in_place=True)  # no copy when there is no orientation tag
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ValueError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from None


def image_pixel_values(
    images: list[Image.Image],
    geometry: VisionGeometry,
    min_tiles: int,
    max_tiles: int,
    use_thumbnail: bool,
    normalization: str = "imagenet",
) -> tuple[torch.Tensor, list[int]]:
    """All tiles of a sample's images in text order (n, 3, S, S) and the tile count of each image.

    A multi-image sample splits the tile budget: each image gets max(1, max_tiles // n_images);
    min_tiles is lowered to that budget when it would exceed it.
    """
    budget = tile_budget(max_tiles, len(images))
    low = min(min_tiles, budget)
    tiles = [tile_image(im, geometry.tile_size, low, budget, use_thumbnail) for im in images]
    counts = [t.shape[0] for t in tiles]
    return normalize_tiles(np.concatenate(tiles, axis=0), normalization), counts
