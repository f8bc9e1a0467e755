"""Real images for model-input tests: a JPEG file's bytes and a normalised tile tensor (coloured noise)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def jpeg_bytes(width: int, height: int, color: tuple[int, int, int], seed: int = 0) -> bytes:
    """A real JPEG: a colour with noise."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color, dtype=np.int16) + rng.integers(-20, 20, size=(height, width, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def image_tile(color: tuple[int, int, int], size: int, seed: int) -> torch.Tensor:
    """A real RGB image (a colour with noise) resized to one tile and ImageNet-normalised: (3, size, size)."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color, dtype=np.int16) + rng.integers(-20, 20, size=(size * 2, size * 3, 3)), 0, 255)
    img = Image.fromarray(arr.astype(np.uint8), "RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def photo_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth light falloff, texture at several scales, a few objects whose edges are
    about two pixels soft (as a photo's optics and demosaicing give) and sensor noise. Built mostly at
    reduced resolution and by PIL's C code, so a 4000x3000 photo takes a fraction of a second."""
    from PIL import ImageChops, ImageDraw

    rng = np.random.default_rng(seed)
    qw, qh = max(width // 4, 2), max(height // 4, 2)
    y, x = np.mgrid[0:qh, 0:qw].astype(np.float32)
    x, y = x / qw, y / qh
    low = np.stack([np.sin(3 * x + 2 * y + p) for p in rng.uniform(0, 6, 3)], -1) * 60 + rng.uniform(80, 170, 3)
    for cell in (16, 4, 1):  # smooth texture blobs, from large to fine (in quarter-resolution pixels)
        blobs = np.clip(rng.normal(128, 14, (qh // cell + 1, qw // cell + 1, 3)), 0, 255).astype(np.uint8)
        low += np.asarray(Image.fromarray(blobs).resize((qw, qh), Image.Resampling.BICUBIC), dtype=np.float32) - 128
    half = Image.fromarray(np.clip(low, 0, 255).astype(np.uint8)).resize(
        (max(width // 2, 1), max(height // 2, 1)), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(half)
    for _ in range(4):  # objects drawn at half resolution: their edges end up ~2 px soft
        x0, y0 = int(rng.integers(0, half.width)), int(rng.integers(0, half.height))
        x1, y1 = x0 + int(rng.integers(1, max(half.width // 3, 2))), y0 + int(rng.integers(1, max(half.height // 3, 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    full = half.resize((width, height), Image.Resampling.BICUBIC)
    grain = np.clip(rng.normal(128, 3, (257, 263, 3)), 0, 255).astype(np.uint8)  # sensor noise, tiled
    noise = Image.fromarray(np.tile(grain, (height // 257 + 1, width // 263 + 1, 1))[:height, :width])
    photo = ImageChops.add(full, noise, scale=1.0, offset=-128)
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
