"""The generated demo data set: reproducible, one data set per question type, answers true to the pictures,
and a held-out split of the demo config that has enough of each question type to score it."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from vlm_core.config import load_config
from vlm_core.data.shards import plan_shards
from vlm_core.demo import COLOURS, DATASETS, SAMPLES, SHAPES, write_demo_data

ROOT = Path(__file__).resolve().parents[1]
BACKGROUND = (250, 250, 250)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _records(folder: Path) -> dict[str, list[dict]]:
    meta = json.loads((folder / "meta.json").read_text())
    return {name: [json.loads(line) for line in (folder / spec["annotation"]).read_text().splitlines()]
            for name, spec in meta.items()}


def _drawn(path: Path) -> tuple[tuple[int, int, int], str]:
    """The colour of the shape in a demo image and which shape it is, from its pixels alone: the share of
    its bounding box it fills (square 1, circle pi/4, triangle 1/2)."""
    pixels = np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))
    drawn = (pixels != BACKGROUND).any(axis=-1)
    colours, counts = np.unique(pixels[drawn], axis=0, return_counts=True)
    assert len(colours) == 1, f"{path.name}: one flat colour expected, found {len(colours)}"
    rows, cols = np.nonzero(drawn)
    share = drawn.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    shape = "square" if share > 0.92 else "circle" if share > 0.65 else "triangle"
    return tuple(int(v) for v in colours[0]), shape


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a, b, c = (write_demo_data(tmp_path / name, n=30, seed=seed).parent for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    first = _files(a)
    assert len(first) > 30 and first == _files(b)
    other = _files(c)
    assert other.keys() == first.keys() and other != first


def test_one_data_set_per_question_type_and_answers_match_the_pictures(tmp_path):
    folder = write_demo_data(tmp_path / "demo", n=60).parent
    records = _records(folder)
    assert tuple(records) == DATASETS and sum(map(len, records.values())) == 60
    images = folder / "images"
    for rec in records["colour"]:
        fill, _ = _drawn(images / rec["image"])
        assert COLOURS[rec["conversations"][-1]["value"]] == fill, rec
    for rec in records["shape"]:
        assert _drawn(images / rec["image"])[1] == rec["conversations"][-1]["value"] in SHAPES, rec
    answers = []
    for rec in records["same_colour"]:
        first, second = (_drawn(images / name)[0] for name in rec["image"])
        answers.append(rec["conversations"][-1]["value"])
        assert answers[-1] == ("Yes" if first == second else "No"), rec
    assert set(answers) == {"Yes", "No"}
    for rec in records["text"]:
        assert "image" not in rec and rec["conversations"][0]["value"] == f"Say {rec['conversations'][-1]['value']}."


def test_demo_config_holds_out_enough_of_each_question_type(tmp_path):
    """What `make run` evaluates: the demo config's held-out split of the default demo data set."""
    meta = write_demo_data(tmp_path / "data")
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.meta={meta}", f"data.shards={tmp_path / 'shards'}"])
    plan = plan_shards(cfg.data)
    held_out = Counter(plan.datasets[u.dataset].name for g in plan.groups if g.split == "eval" for u in g.units)
    assert sum(held_out.values()) == cfg.data.eval_count == 64 and SAMPLES == 1200
    assert held_out["colour"] >= 12 and held_out["shape"] >= 12 and held_out["same_colour"] and held_out["text"]
