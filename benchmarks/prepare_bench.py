"""Prepare throughput vs a bare webdataset.ShardWriter loop writing the same bytes, side by side.

    .venv/bin/python benchmarks/prepare_bench.py [--samples 2000] [--write-readme]

The bare loop reads each image file and writes it with its JSON record, nothing else: the floor
any shard writer pays. `prepare_shards` also parses and validates every record, proves every image
intact (data.image_check: decode or verify), fingerprints the inputs and writes the manifest.
Peak RSS is measured in fresh subprocesses at 1k and 10k samples.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlm_core.config import DataConfig  # noqa: E402
from vlm_core.data.shards import prepare_shards  # noqa: E402

WORK = Path("/tmp/vlm_prepare_bench")


def make_images(n: int) -> list[str]:
    """448-px-class JPEGs (gradient + noise, ~90 KB at quality 90), cached between runs."""
    folder = WORK / "images"
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"im{i:05d}.jpg"
        names.append(name)
        if (folder / name).exists():
            continue
        w, h = 448 + (i * 37) % 160 - 80, 448 + (i * 53) % 160 - 80
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.int16)
        arr = np.clip(base + np.random.default_rng(i).integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        (folder / name).write_bytes(buf.getvalue())
    return names


def write_annotations(names: list[str], n_samples: int, path: Path) -> Path:
    with open(path, "w") as f:
        for i in range(n_samples):
            rec = {"id": f"s{i}", "image": names[i % len(names)],
                   "conversations": [{"from": "human", "value": "<image>\nWhat is in the picture?"},
                                     {"from": "gpt", "value": f"A gradient, number {i}."}]}
            f.write(json.dumps(rec) + "\n")
    meta = path.with_suffix(".meta.json")
    meta.write_text(json.dumps({"bench": {"root": str(WORK / "images"), "annotation": str(path)}}))
    return meta


def bare_loop(annotation: Path, out: Path, per_shard: int) -> float:
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with wds.ShardWriter(str(out / "bare-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, line in enumerate(annotation.read_text().splitlines()):
            rec = json.loads(line)
            data = (WORK / "images" / rec["image"]).read_bytes()
            sink.write({"__key__": f"s{i:09d}", "json": json.dumps(rec).encode(), "img0.jpg": data})
    return time.perf_counter() - t


def ours(meta: Path, out: Path, workers: int, per_shard: int, check: str) -> float:
    cfg = DataConfig(meta=str(meta), shards=str(out), samples_per_shard=per_shard, eval_fraction=0.0,
                     image_check=check, prepare_workers=workers)
    t = time.perf_counter()
    m = prepare_shards(cfg, workers=workers)
    assert m.train.samples > 0
    return time.perf_counter() - t


RSS_SCRIPT = """
import resource, sys
sys.path.insert(0, sys.argv[3])
from vlm_core.config import DataConfig
from vlm_core.data.shards import prepare_shards
prepare_shards(DataConfig(meta=sys.argv[1], shards=sys.argv[2], samples_per_shard=1000, eval_fraction=0.0), workers=1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def peak_rss_mb(meta: Path, out: Path) -> int:
    res = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(meta), str(out), str(ROOT)],
                         capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    names = make_images(args.samples)
    ann = WORK / "ann.jsonl"
    meta = write_annotations(names, args.samples, ann)
    mb = sum((WORK / "images" / n).stat().st_size for n in names) / 2**20
    rows = []

    def run(label, fn):
        shutil.rmtree(WORK / "out", ignore_errors=True)
        fn(WORK / "out")  # warm the page cache and imports
        shutil.rmtree(WORK / "out", ignore_errors=True)
        secs = fn(WORK / "out")
        rows.append((label, secs))
        print(f"{label:45s} {secs:6.2f} s  {args.samples / secs:8.0f} samples/s  {mb / secs:7.1f} MB/s", flush=True)

    run("bare webdataset.ShardWriter loop", lambda o: bare_loop(ann, o, args.per_shard))
    for check in ("decode", "verify"):
        for workers in (1, 2):
            run(f"prepare_shards image_check={check} workers={workers}",
                lambda o, c=check, w=workers: ours(meta, o, w, args.per_shard, c))
    base = rows[0][1]
    rss = {}
    for n in (1000, 10000):
        m = write_annotations(names, n, WORK / f"ann{n}.jsonl")
        shutil.rmtree(WORK / "rss", ignore_errors=True)
        rss[n] = peak_rss_mb(m, WORK / "rss")
        print(f"peak RSS at {n} samples: {rss[n]} MB", flush=True)

    lines = [
        "## Shard preparation (`benchmarks/prepare_bench.py`)",
        "",
        f"{args.samples} single-image samples, 448-px-class JPEGs ({mb:.0f} MB), {args.per_shard} samples per shard, "
        f"local disk, 2-core machine, one run. Ratio = bare-loop time / our time (higher is better).",
        "",
        "| writer | seconds | samples/s | MB/s | ratio vs bare loop |",
        "|---|---|---|---|---|",
    ]
    for label, secs in rows:
        lines.append(f"| {label} | {secs:.2f} | {args.samples / secs:.0f} | {mb / secs:.1f} | {base / secs:.2f}x |")
    lines += ["", f"Peak RSS of a whole prepare run: {rss[1000]} MB at 1,000 samples, {rss[10000]} MB at 10,000 samples.",
              "", "Reproduce: `.venv/bin/python benchmarks/prepare_bench.py --write-readme`", ""]
    print("\n".join(lines))
    if args.write_readme:
        from common import write_section

        write_section("## Shard preparation", lines)


if __name__ == "__main__":
    main()
