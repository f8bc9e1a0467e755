"""The bundled demo data set, generated (no binary files in git): coloured shapes a tiny model can learn.

`write_demo_data(folder)` writes an InternVL meta JSON, a JSONL annotation file and PNG images:
single-image questions ("What colour is the shape?" → "red."), two-image questions ("Are the shapes
the same colour?" → "Yes." / "No."), shape questions, and text-only prompts ("Say blue." → "blue.").
The same seed gives byte-identical files.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from vlm_core.config import DataConfig

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def shape_png(colour: str, shape: str, size: tuple[int, int], rnd: random.Random) -> bytes:
    w, h = size
    img = Image.new("RGB", size, (250, 250, 250))
    draw = ImageDraw.Draw(img)
    s = min(w, h) * rnd.uniform(0.45, 0.7)
    cx, cy = w / 2 + rnd.uniform(-0.1, 0.1) * w, h / 2 + rnd.uniform(-0.1, 0.1) * h
    box = (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": f, "value": v} for f, v in pairs]


def demo_records(n: int, images: Path, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    names = list(COLOURS)
    records = []
    for i in range(n):
        kind = i % 6
        colour, shape = rnd.choice(names), rnd.choice(SHAPES)
        size = rnd.choice([(96, 96), (160, 96), (96, 160), (128, 128)])
        rid = f"demo-{i:05d}"
        if kind == 5:  # text only
            records.append({"id": rid, "conversations": _turns(("human", f"Say {colour}."), ("gpt", f"{colour}."))})
            continue
        name = f"{rid}.png"
        (images / name).write_bytes(shape_png(colour, shape, size, rnd))
        if kind in (0, 1, 2):
            q = rnd.choice(["What colour is the shape?", "Which colour is it?"])
            records.append({"id": rid, "image": name, "width": size[0], "height": size[1],
                            "conversations": _turns(("human", f"<image>\n{q}"), ("gpt", f"{colour}."))})
        elif kind == 3:
            records.append({"id": rid, "image": name,
                            "conversations": _turns(("system", "Answer with one word."),
                                                    ("human", "<image>\nWhat shape is it?"), ("gpt", f"{shape}."))})
        else:  # two images
            other = colour if rnd.random() < 0.5 else rnd.choice([c for c in names if c != colour])
            second = f"{rid}-b.png"
            (images / second).write_bytes(shape_png(other, rnd.choice(SHAPES), (96, 96), rnd))
            answer = "Yes." if other == colour else "No."
            records.append({"id": rid, "image": [name, second],
                            "conversations": _turns(("human", "<image>\n<image>\nAre the shapes the same colour?"),
                                                    ("gpt", answer))})
    return records


def write_demo_data(folder: str | Path, n: int = 240, seed: int = 0) -> Path:
    """Write the demo data set to `folder`; returns the meta JSON path (use it as data.meta)."""
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = demo_records(n, images, seed)
    (folder / "demo.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    meta = folder / "meta.json"
    meta.write_text(json.dumps({"shapes": {"root": "images", "annotation": "demo.jsonl", "repeat_time": 1,
                                           "max_dynamic_patch": 2}}, indent=1) + "\n")
    return meta


def ensure_demo_data(data: DataConfig) -> Path | None:
    """With data.write_demo_if_missing, write the demo data set where data.meta points when it is missing
    (a first run of the demo deployment on a fresh server); returns the folder written, else None.
    meta.json is written last, so a file there means a whole data set."""
    meta = Path(data.meta)
    if not data.write_demo_if_missing or meta.exists():
        return None
    write_demo_data(meta.parent)
    return meta.parent
