"""The bundled demo data set, generated (no binary files in git): coloured shapes a tiny model can learn.

`write_demo_data(folder)` writes an InternVL meta JSON with one data set per question type, so that
whatever is reported per data set (the eval split's counts, a per-data-set score) is reported per
question type:

* `colour`: one image, "What colour is the shape?" → "red" (4 colours, chance 25 %);
* `shape`: one image, "What shape is it?" → "circle" (3 shapes, chance 33 %; a system prompt on half);
* `same_colour`: two images, "Are the shapes the same colour?" → "Yes" / "No" (chance 50 %);
* `text`: no image, "Say blue." → "blue".

It is made so that the tiny random model of the demo (`vlm_core.model.tiny`, its vision encoder
frozen) learns it within the demo's few hundred steps, and so that a generative evaluation can tell:

* Answers are one word without a final period: what an exact-match score compares.
* Shapes fill 75-90 % of the image's shorter side, near its centre. The model sees a tile as 4 x 4
  tokens of random (frozen) vision features; a large shape makes circle, square and triangle differ
  in which tokens are covered, which the projector and language model learn in a few hundred steps.
  Smaller shapes at random places (45-70 %, ±10 %) stayed near chance for shape questions at the
  same budget.
* Shape and same-colour questions use square images (one tile each); colour questions also use wide
  and tall ones, which are cut into two tiles plus a thumbnail, so dynamic tiling is part of the
  demo. A shape cut across tiles and squeezed in the thumbnail was again much harder to learn.
* 4 of every 10 samples ask for the shape (the hardest type), 3 for the colour, 2 compare colours
  and 1 is text-only.

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
SQUARE = ((96, 96), (128, 128))  # one tile each
SIZES = (*SQUARE, (160, 96), (96, 160))  # a wide or tall image becomes two tiles and a thumbnail
SCALE = (0.75, 0.9)  # the shape's size, as a fraction of the image's shorter side
SHIFT = 0.03  # the largest offset of the shape's centre from the image's centre, as a fraction of the side
COLOUR_QUESTIONS = ("What colour is the shape?", "Which colour is it?", "What is the colour of the shape?")
SHAPE_QUESTIONS = ("What shape is it?", "Which shape is shown?", "What is the shape in the image?")
# The data sets (= question types) in the order the records cycle through them.
CYCLE = ("colour", "shape", "same_colour", "colour", "shape", "text", "colour", "shape", "same_colour", "shape")
DATASETS = ("colour", "shape", "same_colour", "text")
SAMPLES = 1200  # what `vlmft demo-data` and `make run` write: 1136 to train on, 64 held out


def shape_png(colour: str, shape: str, size: tuple[int, int], rnd: random.Random) -> bytes:
    """A PNG of one filled shape on a light background, at a random scale and position."""
    w, h = size
    img = Image.new("RGB", size, (250, 250, 250))
    draw = ImageDraw.Draw(img)
    s = min(w, h) * rnd.uniform(*SCALE)
    cx, cy = w / 2 + rnd.uniform(-SHIFT, SHIFT) * w, h / 2 + rnd.uniform(-SHIFT, SHIFT) * h
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


def demo_records(n: int, images: Path, seed: int = 0) -> dict[str, list[dict]]:
    """`n` records, cycling through the question types ({data set: records}); their images go to `images`."""
    rnd = random.Random(seed)
    names = list(COLOURS)
    records: dict[str, list[dict]] = {name: [] for name in DATASETS}
    for i in range(n):
        kind = CYCLE[i % len(CYCLE)]
        colour, shape = rnd.choice(names), rnd.choice(SHAPES)
        rid = f"demo-{i:05d}"
        if kind == "text":
            records[kind].append({"id": rid, "conversations": _turns(("human", f"Say {colour}."), ("gpt", colour))})
            continue
        size = rnd.choice(SIZES if kind == "colour" else SQUARE)
        name = f"{rid}.png"
        (images / name).write_bytes(shape_png(colour, shape, size, rnd))
        if kind == "colour":
            q = rnd.choice(COLOUR_QUESTIONS)
            records[kind].append({"id": rid, "image": name, "width": size[0], "height": size[1],
                                  "conversations": _turns(("human", f"<image>\n{q}"), ("gpt", colour))})
        elif kind == "shape":
            turns = _turns(("human", f"<image>\n{rnd.choice(SHAPE_QUESTIONS)}"), ("gpt", shape))
            if rnd.random() < 0.5:
                turns.insert(0, {"from": "system", "value": "Answer with one word."})
            records[kind].append({"id": rid, "image": name, "conversations": turns})
        else:  # two images: same colour or not, half and half
            other = colour if rnd.random() < 0.5 else rnd.choice([c for c in names if c != colour])
            second = f"{rid}-b.png"
            (images / second).write_bytes(shape_png(other, rnd.choice(SHAPES), rnd.choice(SQUARE), rnd))
            answer = "Yes" if other == colour else "No"
            records[kind].append({"id": rid, "image": [name, second],
                                  "conversations": _turns(("human", "<image>\n<image>\nAre the shapes the same colour?"),
                                                          ("gpt", answer))})
    return records


def write_demo_data(folder: str | Path, n: int = SAMPLES, seed: int = 0) -> Path:
    """Write the demo data set (`n` samples) to `folder`; returns the meta JSON path (use it as data.meta)."""
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    meta = {}
    for name, records in demo_records(n, images, seed).items():
        if not records:  # a tiny n may leave a question type out
            continue
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        meta[name] = {"root": "images", "annotation": f"{name}.jsonl", "repeat_time": 1, "max_dynamic_patch": 2}
    path = folder / "meta.json"
    path.write_text(json.dumps(meta, indent=1) + "\n")
    return path


def ensure_demo_data(data: DataConfig) -> Path | None:
    """With data.write_demo_if_missing, write the demo data set where data.meta points when it is missing
    (a first run of the demo deployment on a fresh server); returns the folder written, else None.
    meta.json is written last, so a file there means a whole data set."""
    meta = Path(data.meta)
    if not data.write_demo_if_missing or meta.exists():
        return None
    write_demo_data(meta.parent)
    return meta.parent
