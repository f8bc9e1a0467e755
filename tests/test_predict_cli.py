"""`vlmft predict`: one prompt answered, a data set answered and scored, bad input in one line."""

from __future__ import annotations

import json

import pytest

from helpers.images import jpeg_bytes
from helpers.shard_sets import demo_records, write_jsonl_set
from vlmft.cli import main

COMMON = ["model.dtype=float32", "data.max_dynamic_patch=2", "data.max_seq_length=1024"]


def test_predict_one_prompt_prints_the_answer(tiny_model_dir, tmp_path, capsys):
    from vlm_core.config import DataConfig
    from vlm_core.infer import load_predictor, question_from_prompt

    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(60, 40, (30, 200, 30)))
    args = ["--model", str(tiny_model_dir), "--image", str(tmp_path / "a.jpg"), "--prompt", "What colour?"]
    assert main(["predict", *args, "--max-new-tokens", "5", *COMMON]) == 0
    printed = capsys.readouterr().out.strip()
    q = question_from_prompt("What colour?", [str(tmp_path / "a.jpg")])
    predictor = load_predictor(str(tiny_model_dir), data=DataConfig(max_dynamic_patch=2, max_seq_length=1024))
    assert printed == predictor.predict([q], max_new_tokens=5)[0]


def test_predict_a_data_set_writes_predictions_and_prints_metrics(tiny_model_dir, tmp_path, capsys):
    ann = write_jsonl_set(tmp_path / "loose", demo_records(6))
    out = tmp_path / "preds" / "predictions.jsonl"
    rc = main(["predict", "--model", str(tiny_model_dir), "--data", str(ann), "--out", str(out), "--max-samples", "5",
               "--max-new-tokens", "4", "--batch-size", "2", *COMMON])
    said = capsys.readouterr().out
    assert rc == 0, said
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"s{i:05d}" for i in range(5)]
    assert set(rows[0]) == {"id", "dataset", "prompt", "reference", "prediction"}
    assert rows[0]["reference"] == "0" and rows[2]["prompt"] == "Which sample?"
    assert "5 answers in " in said and str(out) in said
    table = said.splitlines()[-2:]
    assert table[0].split() == ["demo", "5", *table[0].split()[2:]] and table[1].startswith("overall")


@pytest.mark.parametrize(("argv", "says"), [  # a missing image, a folder that is no model, an adapter without its
    (["--model", "M"], ["either --prompt", "--data"]),  # base: in test_user_errors_cli's table
    (["--model", "M", "--data", "x.txt"], ["--data x.txt", "expected a JSONL"]),
    (["--model", "M", "--data", "x.jsonl", "--image", "a.jpg"], ["--image goes with --prompt"]),
])
def test_bad_arguments_are_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch, argv, says):
    monkeypatch.chdir(tmp_path)
    rc = main(["predict", *argv, *COMMON])
    out, err = capsys.readouterr()
    assert rc == 2, out + err
    assert err.count("\n") == 1 and err.startswith("vlmft: ") and "Traceback" not in out + err, err
    for text in says:
        assert text in err, err
