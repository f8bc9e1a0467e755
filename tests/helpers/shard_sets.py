"""Data sets for the model-input tests: the same records as loose JSONL + images and as WebDataset
shards written with plain webdataset (the shard contract of vlm_core/data/sample.py), so the loader
is tested against shards that the project's own shard writer did not make."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from helpers.images import jpeg_bytes

DEMO_COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}
DEMO_SIZES = [(64, 48), (48, 96), (120, 40), (100, 100), (30, 90)]


def demo_records(n: int, seed: int = 0) -> list[dict]:
    """n InternVL-style records cycling through text-only, one-image and two-image samples.

    Each record: {"id", "conversations", "images": [(path, jpeg bytes, width, height)]}; the reply
    names the sample number so tests can tell samples apart.
    """
    names = list(DEMO_COLORS)
    records = []
    for i in range(n):
        color = names[(i + seed) % len(names)]
        kind = i % 3
        images = []
        for k in range(kind):
            w, h = DEMO_SIZES[(i + k) % len(DEMO_SIZES)]
            images.append((f"img/{i:05d}_{k}.jpg", jpeg_bytes(w, h, DEMO_COLORS[color], seed * 1000 + i * 10 + k), w, h))
        if kind == 0:
            conv = [{"from": "human", "value": f"Say the word {i}"}, {"from": "gpt", "value": f"{i}"}]
        elif kind == 1:
            conv = [
                {"from": "human", "value": "<image>\nWhat color is the image?"},
                {"from": "gpt", "value": f"It is {color} {i}."},
            ]
        else:
            conv = [
                {"from": "system", "value": "You are a helpful assistant."},
                {"from": "human", "value": "<image> and <image>: which color?"},
                {"from": "gpt", "value": f"Both are {color}."},
                {"from": "human", "value": "Which sample?"},
                {"from": "gpt", "value": f"{i}"},
            ]
        records.append({"id": f"s{i:05d}", "conversations": conv, "images": images})
    return records


def write_jsonl_set(folder: Path, records: list[dict]) -> Path:
    """InternVL JSONL + loose image files under `folder`; returns the annotation path."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in records:
        for path, data, _, _ in r["images"]:
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(data)
        line = {"id": r["id"], "conversations": r["conversations"]}
        if r["images"]:
            line["image"] = [p for p, *_ in r["images"]] if len(r["images"]) > 1 else r["images"][0][0]
        lines.append(json.dumps(line))
    annotation = folder / "demo.jsonl"
    annotation.write_text("\n".join(lines) + "\n")
    return annotation


def write_shard_set(folder: Path, records: list[dict], per_shard: int) -> Path:
    """WebDataset tar shards (`key.json` = ShardSample, `key.imgK.jpg`) + manifest.json in `folder`."""
    import webdataset as wds

    from vlm_core.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, SplitInfo
    from vlm_core.data.sample import ImageRef, ShardSample, Source, sample_key

    folder.mkdir(parents=True, exist_ok=True)
    infos = []
    for start in range(0, len(records), per_shard):
        name = f"train-{start // per_shard:06d}.tar"
        chunk = records[start : start + per_shard]
        with wds.TarWriter(str(folder / name), encoder=False) as sink:
            for line, r in enumerate(chunk, start=start + 1):
                record = ShardSample(
                    id=r["id"],
                    conversations=r["conversations"],
                    images=[ImageRef(member=f"img{k}.jpg", path=p, width=w, height=h)
                            for k, (p, _, w, h) in enumerate(r["images"])],
                    source=Source(dataset="demo", file="demo.jsonl", line=line),
                )
                sample = {"__key__": sample_key("demo", line), "json": record.model_dump_json(by_alias=True).encode()}
                sample.update({f"img{k}.jpg": data for k, (_, data, _, _) in enumerate(r["images"])})
                sink.write(sample)
        blob = (folder / name).read_bytes()
        infos.append(ShardInfo(name=name, samples=len(chunk), bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest()))
    split = SplitInfo(shards=infos, samples=len(records), bytes=sum(i.bytes for i in infos))
    (folder / MANIFEST_NAME).write_text(Manifest(fingerprint="test", train=split).model_dump_json(indent=2))
    return folder
