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
    """A photo-like JPEG: smooth light falloff, texture at several scales, a few objects with
    lens-soft edges (about one pixel of blur, as a photo's optics give) and sensor noise."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x, y = x / max(width, 1), y / max(height, 1)
    phase = rng.uniform(0, 6, 3)
    img = np.stack([np.sin(3 * x + 2 * y + p) for p in phase], -1) * 60 + rng.uniform(80, 170, 3)
    for cell in (64, 16, 4):  # blobs of texture, from large to fine
        small = rng.normal(0, 14, (height // cell + 2, width // cell + 2, 3)) + 128
        layer = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize(
            (width + cell * 2, height + cell * 2), Image.Resampling.BICUBIC)
        img += np.asarray(layer, dtype=np.float32)[cell:cell + height, cell:cell + width] - 128
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(4):
        x0, y0 = rng.integers(0, max(width, 2)), rng.integers(0, max(height, 2))
        x1, y1 = x0 + rng.integers(1, max(width // 3, 2)), y0 + rng.integers(1, max(height // 3, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    canvas = canvas.filter(ImageFilter.GaussianBlur(1.0))
    noisy = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 3, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
