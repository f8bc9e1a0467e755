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
