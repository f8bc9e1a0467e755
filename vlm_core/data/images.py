"""Read and check one image for a shard: safe path, real image, sane size, RGB, upright.

Shards keep an image's original bytes whenever they are a valid RGB JPEG or PNG that needs no
change, so nothing is re-compressed for nothing. Anything else is converted once here, so training
never meets an odd mode: palette and grey become RGB, CMYK is converted, alpha is composited on
white (what a viewer shows), EXIF orientation is applied. Converted images are re-encoded
losslessly as PNG. Every problem raises `ImageReject` with one of the reasons below; the caller
records it in rejected.jsonl.
"""

from __future__ import annotations

import io
import os
import posixpath
import warnings
from dataclasses import dataclass
from functools import lru_cache

import fsspec
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageOps, UnidentifiedImageError

REASONS = (
    "empty_image_path",
    "path_escapes_root",
    "missing_image",
    "empty_image",
    "truncated_image",
    "corrupt_image",
    "not_an_image",
    "decompression_bomb",
)
KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png"}
EXIF_ORIENTATION = 0x0112


class ImageReject(Exception):
    """An image that cannot go into a shard; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ShardImage:
    """Bytes to store, their extension, and the upright size."""

    data: bytes
    ext: str
    width: int
    height: int
    converted: bool


def join_under_root(root: str, rel: str) -> str:
    """Join an annotation's image path to its root, refusing empty and absolute paths and `..` escapes."""
    if not rel.strip():
        raise ImageReject("empty_image_path", f"image path {rel!r} is empty; name the image file under {root}")
    if rel.startswith(("/", "\\")) or "://" in rel or (len(rel) > 1 and rel[1] == ":"):
        raise ImageReject("path_escapes_root", f"image path {rel!r} must be relative to the dataset root")
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        raise ImageReject("path_escapes_root", f"image path {rel!r} leaves the dataset root {root}")
    return f"{root.rstrip('/')}/{norm}"


@lru_cache(maxsize=256)
def _root(root: str) -> tuple[fsspec.AbstractFileSystem, str, str | None]:
    """(filesystem, path of the root on it, the resolved local root or None), resolved once per root:
    a data set's images all share it, and resolving it per image costs more than reading a small image."""
    fs, path = fsspec.core.url_to_fs(root)
    return fs, path.rstrip("/"), os.path.realpath(path) if isinstance(fs, LocalFileSystem) else None


def image_location(root: str, rel: str) -> tuple[str, fsspec.AbstractFileSystem, str]:
    """(URL for messages, filesystem, path on it) of image `rel` under `root`; checks the path as
    `join_under_root` does."""
    full = join_under_root(root, rel)
    fs, base, _ = _root(root)
    return full, fs, base + full[len(root.rstrip("/")):]


def read_image_bytes(root: str, rel: str) -> bytes:
    """The raw bytes of `rel` under `root` (a local folder or any fsspec URL).

    A local image is opened with plain `open` and must resolve inside the root (a symlink may not lead
    out of it)."""
    full, fs, path = image_location(root, rel)
    real_root = _root(root)[2]
    try:
        if real_root is None:
            with fs.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            real = os.path.realpath(path)
            if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
                raise ImageReject("path_escapes_root", f"{full} resolves to {real}, outside the dataset root {root}")
            return f.read()
    except FileNotFoundError:
        raise ImageReject("missing_image", f"{full} does not exist") from None
    except IsADirectoryError:
        raise ImageReject("not_an_image", f"{full} is a folder") from None


def _flatten(img: Image.Image) -> Image.Image:
    """RGB from any mode: alpha composited on white, CMYK/palette/grey/16-bit converted."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode.startswith("I"):  # 16-bit grey: keep the top 8 bits rather than clipping at 255
        import numpy as np  # here only: worker processes start faster without it

        arr = np.asarray(img).astype(np.uint32)
        img = Image.fromarray((arr >> 8 if arr.max() > 255 else arr).astype(np.uint8), "L")
    return img.convert("RGB")


def _prove_intact(img: Image.Image, data: bytes, keep: bool, mode: str) -> Image.Image:
    """Prove the image body is intact; return the image, loaded when it must be converted.

    mode "decode" decodes every byte (a JPEG that is kept decodes in draft mode, which still reads the
    whole entropy-coded stream, so truncation and broken data are caught at a fraction of the cost);
    mode "verify" checks structure only: PNG chunk CRCs and the end markers of JPEG and PNG.
    """
    if keep and mode == "verify":
        if img.format == "JPEG":
            if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
                raise OSError("image file is truncated (no JPEG end-of-image marker)")
        else:
            Image.open(io.BytesIO(data)).verify()  # PNG: every chunk's CRC and the IEND chunk
        return img
    if keep and img.format == "JPEG":
        img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
    img.load()
    return img


def check_image(data: bytes, where: str, max_pixels: int, mode: str = "decode") -> ShardImage:
    """Check `data` and return what the shard stores; `where` names the file in errors."""
    if not data:
        raise ImageReject("empty_image", f"{where} is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageReject("decompression_bomb", f"{where}: {exc}") from None
        except UnidentifiedImageError:
            raise ImageReject("not_an_image", f"{where} is not an image PIL can read") from None
        width, height, fmt, img_mode = img.width, img.height, img.format, img.mode
        if width * height > max_pixels:
            raise ImageReject(
                "decompression_bomb",
                f"{where} is {width}x{height} = {width * height} pixels, over data.max_image_pixels={max_pixels}",
            )
        try:
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)  # may read a PNG to its end
            keep = fmt in KEEP_FORMATS and img_mode == "RGB" and orientation in (0, 1)
            img = _prove_intact(img, data, keep, mode)
        except OSError as exc:
            reason = "truncated_image" if "truncated" in str(exc).lower() else "corrupt_image"
            raise ImageReject(reason, f"{where}: {exc}") from None
        except (SyntaxError, ValueError) as exc:
            raise ImageReject("corrupt_image", f"{where}: {exc}") from None
    if keep:
        return ShardImage(data, KEEP_FORMATS[fmt], width, height, converted=False)
    fixed = _flatten(ImageOps.exif_transpose(img))
    out = io.BytesIO()
    fixed.save(out, format="PNG", optimize=False, compress_level=6)
    return ShardImage(out.getvalue(), "png", fixed.width, fixed.height, converted=True)
