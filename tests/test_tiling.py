"""Dynamic tiling: grid choice (with InternVL's tie rule), tile order, thumbnail, budget split, geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_core.data.tiling import (
    NORMALIZATION,
    VisionGeometry,
    closest_grid,
    image_pixel_values,
    normalize_tiles,
    num_tiles,
    tile_budget,
    tile_image,
    vision_geometry,
)


def reference_grid(width: int, height: int, tile: int, lo: int, hi: int) -> tuple[int, int]:
    """InternVL's published rule written independently: closest ratio; among equally close grids, walk up by
    tile count and move to a larger one only when the image area exceeds half its pixel area. Grids with
    the same tile count are tried column-major here, which is not upstream's order: the sweep below avoids
    such exact ties, and `test_grid_ties_between_grids_of_the_same_tile_count` pins upstream's results."""
    grids = [(c, r) for c in range(1, hi + 1) for r in range(1, hi + 1) if lo <= c * r <= hi]
    if not grids:
        return (1, 1)
    dist = {g: abs(width / height - g[0] / g[1]) for g in grids}
    best = min(dist.values())
    tied = sorted((g for g in grids if dist[g] == best), key=lambda g: g[0] * g[1])
    choice = tied[0]
    for g in tied[1:]:
        if width * height > 0.5 * tile * tile * g[0] * g[1]:
            choice = g
    return choice


@pytest.mark.parametrize(
    ("size", "max_tiles", "expected"),
    [
        ((448, 448), 12, (1, 1)),  # square, small: the tie with 2x2 / 3x3 keeps 1x1
        ((900, 900), 12, (2, 2)),  # area 810000 > 0.5·448²·4 but not > 0.5·448²·9
        ((1000, 1000), 12, (3, 3)),  # area > 0.5·448²·9
        ((800, 600), 12, (4, 3)),  # exact ratio 4:3
        ((800, 600), 6, (3, 2)),  # 4:3 not allowed; 3:2 is closest
        ((1000, 100), 12, (10, 1)),  # very wide
        ((100, 1000), 6, (1, 6)),  # very tall, capped by the budget
    ],
)
def test_grid_hand_checked(size, max_tiles, expected):
    assert closest_grid(*size, 448, 1, max_tiles) == expected


def test_grid_sweep_matches_reference():
    sizes = [(w, h) for w in (17, 50, 111, 200, 333, 448, 640, 897, 1024, 1500, 2990) for h in (13, 64, 224, 300, 448, 700, 1080, 2000)]
    checked = 0
    for tile in (112, 448):
        for lo, hi in [(1, 1), (1, 4), (1, 6), (1, 12), (2, 6), (3, 12), (1, 40)]:
            for w, h in sizes:
                assert closest_grid(w, h, tile, lo, hi) == reference_grid(w, h, tile, lo, hi), (w, h, tile, lo, hi)
                checked += 1
    assert checked > 1000


@pytest.mark.parametrize(
    ("size", "min_tiles", "max_tiles", "expected"),
    [  # results of InternVL's own dynamic_preprocess grid code for these inputs; transformers' GotOcr2
        # processor breaks these exact ties the other way ((2, 2), (5, 1), (3, 2)), which is why we keep ours
        ((1000, 400), 4, 4, (4, 1)),
        ((1300, 500), 5, 5, (1, 5)),
        ((1500, 400), 6, 7, (6, 1)),
    ],
)
def test_grid_ties_between_grids_of_the_same_tile_count(size, min_tiles, max_tiles, expected):
    assert closest_grid(*size, 448, min_tiles, max_tiles) == expected


def test_tie_rule_depends_on_area():
    # aspect 1.5 sits exactly between 1:1 and 2:1 (distance 0.5 each) when 3:2 is not allowed (max 2)
    assert closest_grid(150, 100, 448, 1, 2) == (1, 1)  # small image: keep the smaller grid
    assert closest_grid(1500, 1000, 448, 1, 2) == (2, 1)  # area > 0.5·448²·2: take the larger


def test_multi_image_budget_split():
    assert [tile_budget(12, n) for n in (1, 2, 3, 5, 12, 20)] == [12, 6, 4, 2, 1, 1]
    geometry = VisionGeometry(tile_size=112, tokens_per_tile=16)
    wide = Image.new("RGB", (1200, 300))
    _, alone = image_pixel_values([wide], geometry, 1, 12, use_thumbnail=True)
    _, three = image_pixel_values([wide] * 3, geometry, 1, 12, use_thumbnail=True)
    assert alone == [num_tiles(1200, 300, 112, 1, 12, True)] == [5]  # 4x1 grid + thumbnail
    assert three == [num_tiles(1200, 300, 112, 1, 4, True)] * 3 == [5, 5, 5]
    _, many = image_pixel_values([wide] * 13, geometry, 1, 12, use_thumbnail=True)
    assert many == [1] * 13  # budget 1 each: no thumbnail for a single tile


def test_tiles_row_major_then_thumbnail():
    tile = 16
    colors = [(10 * k, 255 - 10 * k, 3 * k) for k in range(6)]
    arr = np.zeros((tile * 2, tile * 3, 3), dtype=np.uint8)  # 3 columns, 2 rows
    for k, color in enumerate(colors):
        row, col = divmod(k, 3)
        arr[row * tile : (row + 1) * tile, col * tile : (col + 1) * tile] = color
    image = Image.fromarray(arr)
    tiles = tile_image(image, tile, 1, 6, use_thumbnail=True)
    assert tiles.shape == (7, tile, tile, 3)
    for k, color in enumerate(colors):
        assert (tiles[k] == np.array(color, dtype=np.uint8)).all(), k
    thumb = np.asarray(image.resize((tile, tile), Image.Resampling.BICUBIC))
    assert np.array_equal(tiles[6], thumb)
    # same pixels as cropping the resized image with PIL, tile by tile (InternVL's way)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 130, 3), dtype=np.uint8))
    cols, rows = closest_grid(130, 70, tile, 1, 6)
    resized = photo.resize((cols * tile, rows * tile), Image.Resampling.BICUBIC)
    crops = [np.asarray(resized.crop(((k % cols) * tile, (k // cols) * tile, (k % cols + 1) * tile, (k // cols + 1) * tile)))
             for k in range(cols * rows)]
    assert np.array_equal(tile_image(photo, tile, 1, 6, use_thumbnail=False), np.stack(crops))


def test_normalization_constants():
    tiles = np.full((1, 4, 4, 3), 255, dtype=np.uint8)
    for name, (mean, std) in NORMALIZATION.items():
        x = normalize_tiles(tiles, name)
        assert x.shape == (1, 3, 4, 4) and x.dtype == torch.float32
        assert torch.allclose(x[0, :, 0, 0], (1 - torch.tensor(mean)) / torch.tensor(std))
    with pytest.raises(ValueError, match="data.normalization"):
        normalize_tiles(tiles, "nope")


def test_geometry_from_model_config(tiny_config):
    assert vision_geometry(tiny_config) == VisionGeometry(tile_size=112, tokens_per_tile=16)
    real = {"vision_config": {"image_size": [448, 448], "patch_size": [14, 14]}, "downsample_ratio": 0.5}
    assert vision_geometry(real) == VisionGeometry(tile_size=448, tokens_per_tile=256)
    with pytest.raises(ValueError, match="image_seq_length"):
        vision_geometry({**real, "image_seq_length": 64})


def test_exif_orientation_is_applied():
    import io

    from vlm_core.data.tiling import open_rgb

    image = Image.new("RGB", (40, 20), (1, 2, 3))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90°: stored 40x20, shown 20x40 (shard records store the shown size)
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif.tobytes())
    assert open_rgb(buf.getvalue()).size == (20, 40)
    buf = io.BytesIO()
    Image.new("RGBA", (5, 7)).save(buf, "PNG")
    assert open_rgb(buf.getvalue()).mode == "RGB"
    with pytest.raises(ValueError, match="x.jpg: cannot decode image"):
        open_rgb(b"nope", "x.jpg")
