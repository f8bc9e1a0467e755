"""Streaming shard loader vs the map-style reference loader, side by side, local disk and S3.

    .venv/bin/python benchmarks/loader_bench.py [--samples 800] [--repeats 2] [--json out.json]

Both loaders read the same samples (written once as WebDataset shards + manifest and once as InternVL
JSONL + loose image files), run the same `Preprocessor` (tiny InternVL geometry: 112 px tiles, up to
6 tiles + thumbnail per image) and `Collator`, with 2 DataLoader workers and batches of 4, for one
epoch each. "S3" is a real `moto_server` on 127.0.0.1 started by this script (no other network); the
reference loader reads each image with one GET, the streaming loader reads whole shards in 8 MiB
blocks. Reported: samples/s and image tiles/s (best of --repeats), and streaming ÷ reference.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import start_moto  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from PIL import Image


def make_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A photo-like JPEG (smooth gradient + blocky noise), ~natural file size for its resolution."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) * 127 // (width + height))], -1)
    noise = rng.normal(0, 18, (height // 4 + 1, width // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:height, :width]
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Mixed samples: 1/6 text-only, 2/3 one image, 1/6 two images; sizes from 320x240 to 800x600."""
    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (480, 640), (800, 600), (320, 240), (800, 400), (448, 448)]
    records = []
    for i in range(n):
        n_images = [0, 1, 1, 1, 1, 2][i % 6]
        images = [(f"img/{i:06d}_{k}.jpg", make_jpeg(rng, *sizes[(i + k) % len(sizes)])) for k in range(n_images)]
        question = " ".join(["<image>"] * n_images) + " What color is the image? Describe the shape."
        reply = f"It is a red circle on a blue square, sample {i}. " * 3
        records.append({"id": f"b{i:06d}", "images": images,
                        "conversations": [{"from": "human", "value": question.strip()}, {"from": "gpt", "value": reply}]})
    return records


def write_loose(folder: Path, records: list[dict]) -> None:
    lines = []
    for r in records:
        for path, data in r["images"]:
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(data)
        line = {"id": r["id"], "conversations": r["conversations"]}
        if r["images"]:
            line["image"] = [p for p, _ in r["images"]]
        lines.append(json.dumps(line))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")


def write_shards(folder: Path, records: list[dict], per_shard: int) -> None:
    import webdataset as wds

    from vlm_core.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, SplitInfo
    from vlm_core.data.sample import ImageRef, ShardSample, Source, sample_key

    folder.mkdir(parents=True, exist_ok=True)
    infos = []
    for start in range(0, len(records), per_shard):
        name = f"train-{start // per_shard:06d}.tar"
        with wds.TarWriter(str(folder / name), encoder=False) as sink:
            for line, r in enumerate(records[start : start + per_shard], start=start + 1):
                refs = []
                for k, (path, data) in enumerate(r["images"]):
                    w, h = Image.open(io.BytesIO(data)).size
                    refs.append(ImageRef(member=f"img{k}.jpg", path=path, width=w, height=h))
                rec = ShardSample(id=r["id"], conversations=r["conversations"], images=refs,
                                  source=Source(dataset="bench", file="data.jsonl", line=line))
                sample = {"__key__": sample_key("bench", line), "json": rec.model_dump_json(by_alias=True).encode()}
                sample.update({f"img{k}.jpg": data for k, (_, data) in enumerate(r["images"])})
                sink.write(sample)
        blob = (folder / name).read_bytes()
        infos.append(ShardInfo(name=name, samples=min(per_shard, len(records) - start), bytes=len(blob),
                               sha256=hashlib.sha256(blob).hexdigest()))
    split = SplitInfo(shards=infos, samples=len(records), bytes=sum(i.bytes for i in infos))
    (folder / MANIFEST_NAME).write_text(Manifest(fingerprint="bench", train=split).model_dump_json(indent=2))


def run_epoch(loader) -> tuple[float, int, int]:
    """Seconds for one epoch (worker start-up included), samples and image tiles seen."""
    start = time.perf_counter()
    samples = tiles = 0
    for batch in loader:
        samples += len(batch["sample_ids"])
        tiles += batch["pixel_values"].shape[0]
    return time.perf_counter() - start, samples, tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=800)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer

    from vlm_core.config import DataConfig
    from vlm_core.data.collator import Collator
    from vlm_core.data.loader import ShardStream, make_dataloader
    from vlm_core.data.preprocess import make_preprocessor
    from vlm_core.data.reference import ReferenceDataset, reference_dataloader
    from vlm_core.model.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="loader-bench-"))
    moto = None
    try:
        t = time.perf_counter()
        model_dir = build_tiny_model(work / "tiny")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        pp = make_preprocessor(tokenizer, DataConfig(max_dynamic_patch=6, max_seq_length=4096),
                               AutoConfig.from_pretrained(model_dir))
        collate = Collator(tokenizer.pad_token_id, 8)
        records = make_records(args.samples)
        write_loose(work / "loose", records)
        write_shards(work / "shards", records, args.per_shard)
        image_mb = sum(len(d) for r in records for _, d in r["images"]) / 2**20
        print(f"data: {args.samples} samples, {sum(len(r['images']) for r in records)} images, {image_mb:.1f} MiB "
              f"of JPEG, {len(list((work / 'shards').glob('*.tar')))} shards; set-up {time.perf_counter() - t:.1f}s")

        moto, _ = start_moto()
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        t = time.perf_counter()
        fs.put(str(work / "shards") + "/", "bench/shards/", recursive=True)
        fs.put(str(work / "loose") + "/", "bench/loose/", recursive=True)
        print(f"uploaded both copies to the local S3 server in {time.perf_counter() - t:.1f}s")

        sources = {"local disk": str(work), "S3 (moto_server)": "s3://bench"}

        def streaming(root: str):
            ds = ShardStream.from_folder(f"{root}/shards", pp, collate, batch_size=args.batch_size, seed=0,
                                         shuffle_buffer=200, num_workers=args.workers, rank=0, world_size=1)
            return make_dataloader(ds)

        def reference(root: str):
            ds = ReferenceDataset(f"{root}/loose/data.jsonl", f"{root}/loose", pp)
            return reference_dataloader(ds, collate, args.batch_size, num_workers=args.workers, seed=0)

        results = []
        for source, root in sources.items():
            best: dict[str, tuple[float, int, int]] = {}
            for _ in range(args.repeats):
                for name, build in (("streaming", streaming), ("reference", reference)):
                    seconds, samples, tiles = run_epoch(build(root))
                    if name not in best or seconds < best[name][0]:
                        best[name] = (seconds, samples, tiles)
            row = {"source": source}
            for name, (seconds, samples, tiles) in best.items():
                row[name] = {"seconds": round(seconds, 2), "samples_per_s": round(samples / seconds, 1),
                             "tiles_per_s": round(tiles / seconds, 1), "samples": samples}
            row["ratio"] = round(row["streaming"]["samples_per_s"] / row["reference"]["samples_per_s"], 2)
            results.append(row)

        print("\n| source | loader | samples/s | tiles/s | epoch s |\n|---|---|---|---|---|")
        for row in results:
            for name in ("streaming", "reference"):
                r = row[name]
                print(f"| {row['source']} | {name} | {r['samples_per_s']} | {r['tiles_per_s']} | {r['seconds']} |")
        print("\n" + "\n".join(f"{row['source']}: streaming / reference = {row['ratio']}x" for row in results))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
