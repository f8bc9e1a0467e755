"""Image preprocessing side by side: our Preprocessor's two resize backends vs transformers' two GotOcr2 processors.

    .venv/bin/python benchmarks/preprocess_bench.py [--photos 200] [--repeats 3] [--threads 1,2] [--json out.json]

Every variant turns the same photo-like JPEG bytes (320x240 ... 4000x3000, both orientations) into
normalised float32 tiles with InternVL's geometry: 448 px tiles, 1..12 tiles + a thumbnail, ImageNet
mean/std, bicubic. Decoding is included in all four (PIL, the same libjpeg-turbo call):

- ours torch: `vlm_core.data.fast_tiling.fast_pixel_values` (data.resize_backend=torch, the default)
- ours pil:   `vlm_core.data.tiling.image_pixel_values` over `open_rgb` (data.resize_backend=pil)
- transformers `GotOcr2ImageProcessorPil` and `GotOcr2ImageProcessor` (torchvision), crop_to_patches=true

The variants run interleaved (the order rotates every repeat), the best of --repeats counts. The
torch intra-op thread count is set per table: 1 is what each DataLoader worker gets. Reported: tiles/s,
speed relative to each transformers processor, and the largest difference from the PIL-exact tiles in
grey levels (0..255), over every tile of every photo. A per-stage timing of our torch path follows.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import write_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the photo-like JPEG generator the tests use

from helpers.images import photo_jpeg  # noqa: E402
from vlm_core.data.fast_tiling import _resize, _scale_bias, decode, fast_pixel_values  # noqa: E402
from vlm_core.data.tiling import NORMALIZATION, VisionGeometry, closest_grid, image_pixel_values, open_rgb  # noqa: E402

TILE, MAX_TILES = 448, 12
GEOMETRY = VisionGeometry(tile_size=TILE, tokens_per_tile=256)
SIZES = [(320, 240), (640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200), (2048, 1536), (3000, 2000),
         (4000, 3000)]


def make_photos(n: int) -> list[bytes]:
    """n photo-like JPEGs cycling through SIZES, every third one in portrait orientation."""
    out = []
    for k in range(n):
        w, h = SIZES[k % len(SIZES)]
        out.append(photo_jpeg(*((h, w) if k % 3 == 2 else (w, h)), seed=k))
    return out


def variants() -> dict[str, Callable[[bytes], torch.Tensor]]:
    from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    mean, std = NORMALIZATION["imagenet"]
    settings = {"crop_to_patches": True, "min_patches": 1, "max_patches": MAX_TILES, "size": {"height": TILE, "width": TILE},
                "resample": 3, "image_mean": list(mean), "image_std": list(std), "do_convert_rgb": True}
    hf_pil, hf_fast = GotOcr2ImageProcessorPil(**settings), GotOcr2ImageProcessor(**settings)

    def hf(processor: Callable) -> Callable[[bytes], torch.Tensor]:
        return lambda data: processor(images=Image.open(io.BytesIO(data)).convert("RGB"),
                                      return_tensors="pt")["pixel_values"]

    return {
        "ours torch": lambda data: fast_pixel_values([data], ["photo"], GEOMETRY, 1, MAX_TILES, True)[0],
        "ours pil": lambda data: image_pixel_values([open_rgb(data)], GEOMETRY, 1, MAX_TILES, True)[0],
        "transformers GotOcr2ImageProcessorPil": hf(hf_pil),
        "transformers GotOcr2ImageProcessor (torchvision)": hf(hf_fast),
    }


def grey_difference(photos: list[bytes], runs: dict[str, Callable]) -> dict[str, float]:
    """Largest |Δ| from the PIL-exact tiles (ours pil), in grey levels, over every tile of every photo."""
    std = torch.tensor(NORMALIZATION["imagenet"][1])[None, :, None, None]
    worst = dict.fromkeys(runs, 0.0)
    for data in photos:
        exact = runs["ours pil"](data)
        for name, run in runs.items():
            got = run(data)
            assert got.shape == exact.shape, (name, got.shape, exact.shape)  # same tile count and order
            worst[name] = max(worst[name], ((got - exact) * std * 255).abs().max().item())
    return worst


def time_variants(photos: list[bytes], runs: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Best-of-`repeats` seconds per variant for all photos; variants interleaved, order rotated each repeat."""
    names, best = list(runs), {}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            for data in photos:
                runs[name](data)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return best


def stages(photos: list[bytes]) -> dict[str, float]:
    """Seconds per stage of our torch path: decode, canvas resize, thumbnail resize, cut + normalise."""
    scale, bias = _scale_bias("imagenet")
    spent = dict.fromkeys(("decode", "resize canvas", "resize thumbnail", "cut + normalise"), 0.0)
    for data in photos:
        t0 = time.perf_counter()
        image = decode(data, "photo")
        cols, rows = closest_grid(image.shape[2], image.shape[1], TILE, 1, MAX_TILES)
        t1 = time.perf_counter()
        canvas = _resize(image, rows * TILE, cols * TILE)
        t2 = time.perf_counter()
        thumb = _resize(image, TILE, TILE) if cols * rows > 1 else None
        t3 = time.perf_counter()
        out = torch.empty(cols * rows + (thumb is not None), 3, TILE, TILE)
        out[: cols * rows].view(rows, cols, 3, TILE, TILE).copy_(
            canvas.unflatten(1, (rows, TILE)).unflatten(3, (cols, TILE)).permute(1, 3, 0, 2, 4))
        if thumb is not None:
            out[-1].copy_(thumb)
        out.mul_(scale).add_(bias)
        t4 = time.perf_counter()
        for key, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            spent[key] += dt
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="torch intra-op thread counts, one table each")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    args = parser.parse_args()

    started = time.perf_counter()
    photos = make_photos(args.photos)
    megapixels = sum(Image.open(io.BytesIO(p)).width * Image.open(io.BytesIO(p)).height for p in photos) / 1e6
    print(f"{len(photos)} photos, {megapixels:.0f} MP, {sum(map(len, photos)) / 2**20:.0f} MiB of JPEG "
          f"(made in {time.perf_counter() - started:.0f} s)", flush=True)
    runs = variants()
    tiles = sum(runs["ours pil"](p).shape[0] for p in photos)
    grey = grey_difference(photos, runs)
    results: dict = {"photos": len(photos), "megapixels": megapixels, "tiles": tiles, "grey_levels": grey, "tables": {}}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        best = time_variants(photos, runs, args.repeats)
        results["tables"][threads] = {name: {"seconds": s, "tiles_per_s": tiles / s} for name, s in best.items()}
        results["tables"][threads]["stages"] = stages(photos)
        print(json.dumps({threads: results["tables"][threads]}, indent=1), flush=True)
    print(json.dumps({"grey_levels": grey}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if not args.no_readme:
        write_readme(results, args)


def write_readme(results: dict, args: argparse.Namespace) -> None:
    hf_pil, hf_fast = "transformers GotOcr2ImageProcessorPil", "transformers GotOcr2ImageProcessor (torchvision)"
    lines = ["## Image preprocessing: resize backends vs transformers' processors (`benchmarks/preprocess_bench.py`)", "",
             "```bash", f".venv/bin/python benchmarks/preprocess_bench.py --photos {args.photos} --repeats {args.repeats} "
             f"--threads {args.threads}", "```", "",
             f"{results['photos']} photo-like JPEGs ({results['megapixels']:.0f} MP; 320x240 to 4000x3000, a third of them "
             f"portrait; `tests/helpers/images.py:photo_jpeg`) → {results['tiles']} normalised 448 px tiles (1..12 + "
             "thumbnail, ImageNet mean/std, bicubic), decoding included in every variant; interleaved, best of "
             f"{args.repeats}. Measured {time.strftime('%Y-%m-%d')}.", ""]
    for threads, table in results["tables"].items():
        lines += [f"torch intra-op threads: {threads}" + (" (what each DataLoader worker gets)" if threads == 1 else ""), "",
                  "| variant | tiles/s | vs GotOcr2 fast (torchvision) | vs GotOcr2ImageProcessorPil | max Δ vs PIL-exact (grey levels) |",
                  "|---|---|---|---|---|"]
        for name in ("ours torch", "ours pil", hf_pil, hf_fast):
            rate = table[name]["tiles_per_s"]
            lines.append(f"| {name} | {rate:.1f} | {rate / table[hf_fast]['tiles_per_s']:.2f}× | "
                         f"{rate / table[hf_pil]['tiles_per_s']:.2f}× | {results['grey_levels'][name]:.0f} |")
        spent = table["stages"]
        total = sum(spent.values())
        lines += ["", "Where `ours torch` spends its time (one extra pass, not best-of): " + ", ".join(
            f"{k} {100 * v / total:.0f} %" for k, v in spent.items()) + ".", ""]
    lines += NOTES
    write_section(lines[0], lines)


NOTES = [
    "Targets: ≥ 1.0× transformers' torchvision processor and ≥ 2× its PIL processor, for `ours torch` within",
    "2 grey levels of the PIL-exact tiles.",
    "",
    "Why `ours torch` beats the torchvision processor, which runs the same resize kernel: both decode with",
    "the same PIL call and resize with PyTorch's uint8 antialiased bicubic (the Pillow-SIMD filter; both",
    "land within 2 grey levels of PIL-exact). The difference is around it. transformers copies each image",
    "once more (`convert(\"RGB\")`, then a numpy array), stacks the tiles and makes them contiguous (two",
    "more copies of every tile) and rescales and normalises tile by tile; ours cuts the tiles as a strided",
    "view of the canvas, writes them once into the float output and scales and shifts that in place. A",
    "cProfile of transformers' torchvision processor on 18 of these photos (1 thread): resize 35 %,",
    "`torch.stack` + `contiguous` 24 %, JPEG decode 15 %, image copies 14 %.",
    "",
    "What was left out, measured: JPEG draft decoding (libjpeg's DCT scaling) would shrink the decode",
    "stage, but the scaled decode skips the chroma upsampling of 4:2:0 JPEGs, so colour edges move by up",
    "to 32 grey levels even when the reduced image is still 3× the canvas; resizing the thumbnail from the",
    "canvas would save most of its stage but filters twice. Both would break the 2-grey-level bound.",
    "The machine is shared (load average 6 to 11 during the run), so absolute rates vary between runs;",
    "the ratios come from interleaved passes over the same photos.",
    "",
]


if __name__ == "__main__":
    main()
