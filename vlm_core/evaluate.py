"""Generative evaluation: answer held-out questions, score the answers, and compare models.

The eval loss says how likely the reference answers are; it does not say whether the model now
answers right. This module asks: a `Predictor` answers the questions (vlm_core.infer), the answers
are scored per data set (vlm_core.metrics), and every answer is kept (predictions.jsonl) so a
score can be checked by reading what the model said. `comparison_rows` and `examples_markdown`
turn a base model's and a fine-tuned model's results on the same questions into the side-by-side
table and examples a run report shows.
"""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from vlm_core.infer import Predictor, Progress, Question
from vlm_core.metrics import METRICS, score

METRIC_LABELS = {"exact_match": "EM", "f1": "F1", "anls": "ANLS"}


@dataclass
class EvalResult:
    """Scores, every answer, and how long answering took."""

    metrics: dict  # vlm_core.metrics.score(): {"overall": {...}, "datasets": {name: {...}}}
    rows: list[dict] = field(default_factory=list)  # {id, dataset, prompt, reference, prediction} per question
    seconds: float = 0.0
    samples_per_second: float = 0.0


def evaluate(predictor: Predictor, questions: list[Question], max_new_tokens: int = 32, batch_size: int = 8,
             progress: Progress | None = None) -> EvalResult:
    """Answer `questions` with `predictor` and score the answers against their references."""
    start = time.perf_counter()
    answers = predictor.predict(questions, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - start
    rows = [{"id": q.id, "dataset": q.dataset, "prompt": q.prompt, "reference": q.reference, "prediction": a}
            for q, a in zip(questions, answers, strict=True)]
    return EvalResult(score(rows), rows, seconds, len(rows) / seconds if seconds > 0 else 0.0)


def write_predictions(rows: list[dict], path: str | Path) -> Path:
    """predictions.jsonl: one {id, dataset, prompt, reference, prediction} object per line, UTF-8."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = ("id", "dataset", "prompt", "reference", "prediction")
    path.write_text("".join(json.dumps({k: r[k] for k in keys}, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def comparison_rows(base: dict, tuned: dict) -> list[dict]:
    """One row per data set and one "overall" row: count and every metric of both models (rounded to 4
    places), from two `score()` results on the same questions."""
    names = [*sorted(tuned["datasets"]), "overall"]
    out = []
    for name in names:
        b = base["overall"] if name == "overall" else base["datasets"].get(name, {})
        t = tuned["overall"] if name == "overall" else tuned["datasets"][name]
        row = {"dataset": name, "count": t["count"]}
        for key in METRICS:
            row[f"base {METRIC_LABELS[key]}"] = round(b.get(key, 0.0), 4)
            row[f"tuned {METRIC_LABELS[key]}"] = round(t[key], 4)
        out.append(row)
    return out


def comparison_table(base: dict, tuned: dict) -> str:
    """`comparison_rows` as a fixed-width text table (for a terminal)."""
    rows = comparison_rows(base, tuned)
    return _text_table([list(rows[0])] + [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()]
                                          for r in rows])


def metrics_table(metrics: dict) -> str:
    """One `score()` result as a fixed-width text table: a row per data set and one overall."""
    names = [*sorted(metrics["datasets"]), "overall"]
    header = ["dataset", "count", *(METRIC_LABELS[k] for k in METRICS)]
    cells = [header]
    for name in names:
        m = metrics["overall"] if name == "overall" else metrics["datasets"][name]
        cells.append([name, str(m["count"]), *(f"{m[k]:.3f}" for k in METRICS)])
    return _text_table(cells)


def _text_table(cells: list[list[str]]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the numbers right-aligned."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                     for row in cells)


def thumbnail_data_uri(image: bytes, size: int = 96) -> str:
    """A PNG data URI of the image shrunk to fit `size` × `size` pixels (for a markdown report)."""
    from PIL import Image

    img = Image.open(io.BytesIO(image)).convert("RGB")
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (no pipes or line breaks)."""
    return text.replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def examples_markdown(questions: list[Question], base: list[dict], tuned: list[dict], n: int) -> str:
    """A markdown table of the first `n` questions: image thumbnail(s), question, reference and the base and
    fine-tuned answers (`rows` of two EvalResults whose questions start with `questions`, in the same order)."""
    lines = ["| image | question | reference | base | fine-tuned |", "|---|---|---|---|---|"]
    for q, b, t in zip(questions[:n], base[:n], tuned[:n], strict=True):
        images = " ".join(f"![image]({thumbnail_data_uri(data)})" for data in q.images) or "(text only)"
        lines.append(f"| {images} | {_cell(q.prompt)} | {_cell(q.reference)} | {_cell(b['prediction'])} | "
                     f"{_cell(t['prediction'])} |")
    return "\n".join(lines) + "\n"
