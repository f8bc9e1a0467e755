"""Prepare throughput vs what a user would write by hand, side by side, interleaved, best of N.

    .venv/bin/python benchmarks/prepare_bench.py [--samples 2000] [--repeats 5] [--write-readme]

The user's loop reads each annotation line and image, proves the image with PIL
(`Image.open(...).load()` for image_check=decode, `Image.verify()` for verify) and writes it with its
JSON record through webdataset's `ShardWriter`. `prepare_shards` also validates every record, checks
the image (size, mode, orientation, end markers), fingerprints the inputs, hashes every shard and
writes rejected.jsonl and the manifest; with 2 processes it also starts its worker pool.

Every measurement runs in a fresh process (`--one`), timed from the call to the end, so a process
pool pays its workers' start-up each time, as a real run does; imports before the
timed call are not counted for either side. Variants run interleaved, N rounds, best of N per
variant (the machine's 2 cores are shared). Peak RSS is measured at 1k and 10k samples.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORK = Path("/tmp/vlm_prepare_bench")
VARIANTS = [  # (label, check, workers, pool); pool None = the user's loop
    ("user loop, Image.open().load()", "decode", 1, None),
    ("prepare, decode, 1 worker", "decode", 1, "threads"),
    ("prepare, decode, 2 threads", "decode", 2, "threads"),
    ("prepare, decode, 2 processes", "decode", 2, "processes"),
    ("user loop, Image.verify()", "verify", 1, None),
    ("prepare, verify, 1 worker", "verify", 1, "threads"),
    ("prepare, verify, 2 threads", "verify", 2, "threads"),
    ("prepare, verify, 2 processes", "verify", 2, "processes"),
]


def make_images(n: int) -> list[str]:
    """448-px-class JPEGs (gradient + noise, ~90 KB at quality 90), cached between runs."""
    import numpy as np
    from PIL import Image

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


def user_loop(annotation: Path, out: Path, per_shard: int, check: str) -> float:
    import webdataset as wds
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with wds.ShardWriter(str(out / "user-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, line in enumerate(annotation.read_text().splitlines()):
            rec = json.loads(line)
            data = (WORK / "images" / rec["image"]).read_bytes()
            img = Image.open(io.BytesIO(data))
            if check == "decode":
                img.load()
            else:
                img.verify()
            sink.write({"__key__": f"s{i:09d}", "json": json.dumps(rec).encode(), "img0.jpg": data})
    return time.perf_counter() - t


def ours(meta: Path, out: Path, workers: int, pool: str, per_shard: int, check: str) -> float:
    from vlm_core.config import DataConfig
    from vlm_core.data.shards import prepare_shards

    cfg = DataConfig(meta=str(meta), shards=str(out), samples_per_shard=per_shard, eval_fraction=0.0,
                     image_check=check, prepare_workers=workers, prepare_pool=pool)
    t = time.perf_counter()
    m = prepare_shards(cfg, workers=workers)
    secs = time.perf_counter() - t
    assert m.train.samples > 0
    return secs


def pool_startup() -> float:
    """Seconds to start a 2-process pool (two spawned workers importing the shard writer), run a trivial
    job and stop it: what the 2-process rows pay before any sample."""
    from vlm_core.config import DataConfig
    from vlm_core.data.pool import process_pool

    t = time.perf_counter()
    with process_pool(DataConfig(meta="unused", shards="unused", prepare_workers=2)) as pool:
        assert [f.result() for f in [pool.submit(abs, -1), pool.submit(abs, -2)]] == [1, 2]
    return time.perf_counter() - t


def one(index: int, samples: int, per_shard: int) -> float:
    """One measurement of VARIANTS[index] (-1: the pool start-up) in this fresh process, on a fresh output."""
    if index == -1:
        return pool_startup()
    _, check, workers, pool = VARIANTS[index]
    out = WORK / "out"
    shutil.rmtree(out, ignore_errors=True)
    if pool is None:
        return user_loop(WORK / "ann.jsonl", out, per_shard, check)
    return ours(WORK / "ann.meta.json", out, workers, pool, per_shard, check)


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
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write-readme", action="store_true")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one measurement, in a fresh process
    args = ap.parse_args()
    if args.one is not None:
        print(one(args.one, args.samples, args.per_shard))
        return
    names = make_images(min(args.samples, 2000))  # more samples than 2000 reuse the images
    write_annotations(names, args.samples, WORK / "ann.jsonl")
    mb = sum((WORK / "images" / names[i % len(names)]).stat().st_size for i in range(args.samples)) / 2**20
    times: dict[int, list[float]] = {i: [] for i in range(len(VARIANTS))}
    cmd = [sys.executable, __file__, "--samples", str(args.samples), "--per-shard", str(args.per_shard)]
    for i in range(len(VARIANTS)):  # warm the page cache
        subprocess.run([*cmd, "--one", str(i)], check=True, capture_output=True)
    for r in range(args.repeats):
        for i, (label, *_) in enumerate(VARIANTS):
            out = subprocess.run([*cmd, "--one", str(i)], check=True, capture_output=True, text=True).stdout
            times[i].append(float(out.strip().splitlines()[-1]))
            print(f"round {r + 1}: {label:32s} {times[i][-1]:6.2f} s", flush=True)
    startup = [float(subprocess.run([*cmd, "--one", "-1"], check=True, capture_output=True, text=True).stdout)
               for _ in range(args.repeats)]
    best = {i: min(t) for i, t in times.items()}

    rss = {}
    for n in (1000, 10000):
        m = write_annotations(names, n, WORK / f"ann{n}.jsonl")
        shutil.rmtree(WORK / "rss", ignore_errors=True)
        rss[n] = peak_rss_mb(m, WORK / "rss")

    lines = [
        "## Shard preparation (`benchmarks/prepare_bench.py`)",
        "",
        f"{args.samples} single-image samples, 448-px-class JPEGs ({mb:.0f} MB, in the page cache), {args.per_shard} "
        "samples per shard, "
        f"local disk, 2-core machine shared with other jobs. Each measurement in a fresh process (a process pool pays "
        f"its start-up every time), variants interleaved, best of {args.repeats} rounds. Ratio = the user's loop time "
        "for the same image check / our time (higher is better).",
        "",
        "| writer | best s | median s | samples/s | ratio vs the user's loop |",
        "|---|---|---|---|---|",
    ]
    for i, (label, check, _, _) in enumerate(VARIANTS):
        base = best[0 if check == "decode" else 4]
        med = sorted(times[i])[len(times[i]) // 2]
        lines.append(f"| {label} | {best[i]:.2f} | {med:.2f} | {args.samples / best[i]:.0f} | {base / best[i]:.2f}x |")
    lines += ["", f"Starting and stopping a 2-process pool (two spawned workers importing the shard writer, "
              f"a trivial job) takes {min(startup):.2f} s (best of {args.repeats}; median "
              f"{sorted(startup)[len(startup) // 2]:.2f} s), paid by every 2-process row above.",
              "", f"Peak RSS of a whole prepare run: {rss[1000]} MB at 1,000 samples, {rss[10000]} MB at 10,000 samples.",
              "", "Reproduce: `.venv/bin/python benchmarks/prepare_bench.py --write-readme`", ""]
    print("\n".join(lines))
    if args.write_readme:
        from common import write_section

        write_section("## Shard preparation", lines)


if __name__ == "__main__":
    main()
