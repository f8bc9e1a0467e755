"""Small real data sets on disk for the data tests (InternVL JSONL + image files, meta JSON): good
samples and one of every bad kind."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg(w: int, h: int, seed: int, mode: str = "RGB", **save) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def conv(*turns: tuple[str, str]) -> list[dict]:
    return [{"from": f, "value": v} for f, v in turns]


def good_records(images: Path, n: int, prefix: str = "s") -> list[dict]:
    """n valid records cycling through single-image, multi-image, text-only, system prompt, no placeholder."""
    images.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        kind = i % 5
        name = f"{prefix}{i:04d}.jpg"
        if kind in (0, 3, 4):
            (images / name).write_bytes(jpeg(40 + 7 * (i % 9), 30 + 5 * (i % 7), seed=i))
        if kind == 0:
            out.append({"id": f"{prefix}{i}", "image": name,
                        "conversations": conv(("human", "<image>\nWhat is shown?"), ("gpt", f"Answer {i}."))})
        elif kind == 1:
            a, b = f"{prefix}{i:04d}a.jpg", f"{prefix}{i:04d}b.jpg"
            (images / a).write_bytes(jpeg(32, 48, seed=1000 + i))
            (images / b).write_bytes(jpeg(64, 24, seed=2000 + i))
            out.append({"id": f"{prefix}{i}", "image": [a, b],
                        "conversations": conv(("human", "<image>\n<image>\nCompare."), ("gpt", "Left is wider."),
                                              ("human", "Sure?"), ("gpt", "Yes."))})
        elif kind == 2:
            out.append({"id": f"{prefix}{i}", "conversations": conv(("human", f"Say {i}."), ("gpt", f"{i}"))})
        elif kind == 3:
            out.append({"id": f"{prefix}{i}", "image": name,
                        "conversations": conv(("system", "Be brief."), ("human", "<image>\nColor?"), ("gpt", "Red."))})
        else:  # single image, no placeholder: InternVL prepends one
            out.append({"id": f"{prefix}{i}", "image": [name], "conversations": conv(("human", "Describe."),
                                                                                    ("gpt", "A picture."))})
    return out


def write_jsonl(path: Path, records: list, raw_lines: list[bytes] = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r).encode() for r in records] + list(raw_lines)
    path.write_bytes(b"\n".join(lines) + b"\n")


def make_meta(folder: Path, datasets: dict[str, dict]) -> Path:
    meta = folder / "meta.json"
    meta.write_text(json.dumps(datasets, indent=1))
    return meta


def bad_dataset(folder: Path) -> tuple[list[dict], list[bytes], dict[str, int]]:
    """Records of every bad kind (plus raw broken lines); returns (records, raw lines, expected reasons)."""
    img = folder / "images"
    img.mkdir(parents=True, exist_ok=True)
    good = jpeg(48, 48, seed=7)
    (img / "ok.jpg").write_bytes(good)
    (img / "zero.jpg").write_bytes(b"")
    (img / "truncated.jpg").write_bytes(jpeg(200, 200, seed=8)[:1500])
    corrupt = bytearray(png(Image.fromarray(np.full((64, 64, 3), 9, np.uint8))))
    corrupt[60:120] = b"\x00" * 60
    (img / "corrupt.png").write_bytes(bytes(corrupt))
    (img / "text.jpg").write_bytes(b"this is not an image at all\n")
    (img / "bomb.png").write_bytes(png(Image.new("L", (3000, 3000))))  # 9 MP, small file
    outside = folder / "outside.jpg"
    outside.write_bytes(good)
    os.symlink(outside, img / "link_out.jpg")
    ok_turns = conv(("human", "<image>\nQ?"), ("gpt", "A."))

    def one(i, image, turns=ok_turns, **extra):
        rec = {"id": f"bad{i}", "conversations": turns, **extra}
        if image is not None:
            rec["image"] = image
        return rec

    records = [
        one(1, "missing.jpg"),
        one(2, "zero.jpg"),
        one(3, "truncated.jpg"),
        one(4, "corrupt.png"),
        one(5, "text.jpg"),
        one(6, "bomb.png"),
        one(7, "../outside.jpg"),
        one(8, "/etc/hostname"),
        one(9, "link_out.jpg"),
        one(10, ["ok.jpg", "ok.jpg"]),  # two images, one placeholder
        one(11, None, []),
        one(12, None, conv(("gpt", "Hi."), ("human", "Q?"))),
        one(13, None, conv(("human", "Q?"), ("human", "Again?"), ("gpt", "A."))),
        one(14, None, conv(("human", "Q?"), ("gpt", "  "))),
        {"id": "good-dup", "conversations": conv(("human", "Q?"), ("gpt", "A."))},
        {"id": "good-dup", "conversations": conv(("human", "Q2?"), ("gpt", "A2."))},
        one(16, None, conv(("human", "Q?"))),
        one(17, None, conv(("human", "Q?"), ("gpt", "A.")), video="v.mp4"),
        one(18, None, [{"from": "robot", "value": "x"}]),
    ]
    raw = [b'{"id": "broken", "conversations": [', b'{"id": "latin1", "x": "caf\xe9"}']
    expected = {
        "missing_image": 1, "empty_image": 1, "truncated_image": 1, "corrupt_image": 1, "not_an_image": 1,
        "decompression_bomb": 1, "path_escapes_root": 3, "image_count_mismatch": 1, "empty_conversation": 1,
        "first_turn_not_user": 1, "roles_not_alternating": 1, "empty_assistant_reply": 1, "duplicate_id": 1,
        "last_turn_not_assistant": 1, "video_not_supported": 1, "bad_record": 1, "invalid_json": 1,
        "not_utf8": 1,
    }
    return records, raw, expected


def training_shards(root: Path, model_dir: Path, n: int, samples_per_shard: int, eval_count: int) -> Path:
    """Shards of `n` good records under root/shards, written by the project's own prepare step for the
    tiny model: the data the training, lock and checkpoint tests train on."""
    from vlm_core.config import load_config
    from vlm_core.data.shards import prepare_shards

    write_jsonl(root / "d" / "ann.jsonl", good_records(root / "d" / "images", n))
    meta = make_meta(root, {"d": {"root": "d/images", "annotation": "d/ann.jsonl"}})
    cfg = load_config(None, [f"model.path={model_dir}", f"data.meta={meta}", f"data.shards={root / 'shards'}",
                             f"data.samples_per_shard={samples_per_shard}", f"data.eval_count={eval_count}",
                             "data.max_dynamic_patch=2"])
    prepare_shards(cfg.data, model=cfg.model)
    return root / "shards"
