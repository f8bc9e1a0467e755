"""Generative evaluation: answers scored per data set, predictions.jsonl, and the base-vs-tuned report parts."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from helpers.shard_sets import demo_records, write_jsonl_set
from vlm_core.config import DataConfig
from vlm_core.data.sample import Turn
from vlm_core.evaluate import (
    comparison_rows,
    comparison_table,
    evaluate,
    examples_markdown,
    metrics_table,
    thumbnail_data_uri,
    write_predictions,
)
from vlm_core.infer import Question, load_predictor, questions_from_jsonl
from vlm_core.metrics import score


def test_evaluate_scores_the_predictors_answers(tiny_model_dir, tmp_path):
    questions = questions_from_jsonl(str(write_jsonl_set(tmp_path / "loose", demo_records(4))))
    predictor = load_predictor(str(tiny_model_dir), data=DataConfig(max_dynamic_patch=2, max_seq_length=1024))
    seen = []
    result = evaluate(predictor, questions, max_new_tokens=4, batch_size=3, progress=lambda d, t: seen.append(d))
    assert seen == [3, 4]
    assert [r["prediction"] for r in result.rows] == predictor.predict(questions, max_new_tokens=4)
    assert [(r["id"], r["dataset"], r["prompt"], r["reference"]) for r in result.rows] == [
        (q.id, "demo", q.prompt, q.reference) for q in questions]
    assert result.metrics == score(result.rows) and result.metrics["overall"]["count"] == 4
    assert result.seconds > 0 and result.samples_per_second == pytest.approx(4 / result.seconds)
    path = write_predictions(result.rows, tmp_path / "out" / "predictions.jsonl")
    assert [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] == result.rows


def _ask(text: str) -> list[Turn]:
    return [Turn.model_validate({"from": "human", "value": text})]


def _rows(dataset: str, pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"dataset": dataset, "prediction": p, "reference": r} for p, r in pairs]


def test_comparison_rows_put_both_models_side_by_side():
    base = score(_rows("shapes", [("blue", "red."), ("no", "yes")]) + _rows("docs", [("helo", "hello")]))
    tuned = score(_rows("shapes", [("Red.", "red."), ("no", "yes")]) + _rows("docs", [("hello", "hello")]))
    rows = comparison_rows(base, tuned)
    assert [r["dataset"] for r in rows] == ["docs", "shapes", "overall"]
    docs, shapes, overall = rows
    assert docs == {"dataset": "docs", "count": 1, "base EM": 0.0, "tuned EM": 1.0, "base F1": 0.0, "tuned F1": 1.0,
                    "base ANLS": 0.8, "tuned ANLS": 1.0}
    assert shapes["base EM"] == 0.0 and shapes["tuned EM"] == 0.5 and shapes["count"] == 2
    assert overall["tuned EM"] == round(2 / 3, 4) and overall["count"] == 3
    table = comparison_table(base, tuned).splitlines()
    assert table[0].split()[:4] == ["dataset", "count", "base", "EM"] and table[-1].startswith("overall")
    assert metrics_table(tuned).splitlines()[-1].split() == ["overall", "3", "0.667", "0.667", "0.667"]


def test_examples_show_thumbnails_question_reference_and_both_answers():
    buf = io.BytesIO()
    Image.new("RGB", (400, 200), (200, 30, 30)).save(buf, format="PNG")
    with_image = Question("a", "shapes", _ask("<image>\nWhat colour? a|b"), [buf.getvalue()], "red.")
    text_only = Question("b", "shapes", _ask("Say blue."), [], "blue.")
    md = examples_markdown([with_image, text_only], [{"prediction": "blue"}, {"prediction": ""}],
                           [{"prediction": "red."}, {"prediction": "blue."}], n=5)
    lines = md.splitlines()
    assert lines[0] == "| image | question | reference | base | fine-tuned |" and len(lines) == 4
    assert "data:image/png;base64," in lines[2] and "<image><br>What colour? a\\|b | red. | blue | red. |" in lines[2]
    assert lines[3] == "| (text only) | Say blue. | blue. | (empty) | blue. |"
    uri = thumbnail_data_uri(buf.getvalue())
    thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert thumb.size == (96, 48)  # fits 96 × 96, aspect kept
    assert len(examples_markdown([with_image, text_only], [{"prediction": ""}] * 2, [{"prediction": ""}] * 2,
                                 n=1).splitlines()) == 3
    # the flow evaluates eval.max_samples questions and shows the first eval.examples of them
    shown = examples_markdown([text_only], [{"prediction": "x"}] * 4, [{"prediction": "y"}] * 4, n=1)
    assert shown.splitlines()[-1] == "| (text only) | Say blue. | blue. | x | y |"
