"""The current-model pointer: the promotion rule, atomic rewrites, a crash before the pointer, S3, and the
`vlmft current` / `vlmft promote` commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import pytest
import s3fs

from vlm_core.config import ConfigError
from vlm_core.promote import (
    POINTER,
    CurrentChanged,
    PointerError,
    decide,
    pointer_url,
    promote,
    read_current,
    read_model_metrics,
    write_pointer,
)
from vlm_core.storage import CHECKSUMS, is_complete, upload_folder
from vlmft.cli import main

ROOT = Path(__file__).resolve().parents[1]


def metrics(em: float, f1: float = 0.5, anls: float = 0.6, count: int = 40) -> dict:
    scores = {"count": count, "exact_match": em, "f1": f1, "anls": anls}
    return {"overall": scores, "datasets": {"shapes": dict(scores)}}


def model_folder(path: Path, lineage: dict | None = None) -> Path:
    """A published model folder as far as promotion looks: config.json (and lineage.json when given)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "internvl"}))
    if lineage is not None:
        (path / "lineage.json").write_text(json.dumps(lineage))
    return path


# ---------------------------------------------------------------------------------------------------
# The rule


@pytest.mark.parametrize(("new", "old", "margin", "wins", "sentence"), [
    (0.912, 0.85, 0.0, True, "exact_match 0.912 ≥ current 0.850 + margin 0.000"),
    (0.85, 0.85, 0.0, True, "exact_match 0.850 ≥ current 0.850 + margin 0.000"),  # a tie promotes
    (0.9, 0.85, 0.05, True, "exact_match 0.900 ≥ current 0.850 + margin 0.050"),  # 0.85 + 0.05 = 0.9000000000000001
    (0.89, 0.85, 0.05, False, "exact_match 0.890 < current 0.850 + margin 0.050"),
    (0.84, 0.85, 0.0, False, "exact_match 0.840 < current 0.850 + margin 0.000"),
    (0.82, 0.85, -0.05, True, "exact_match 0.820 ≥ current 0.850 + margin -0.050"),  # a tolerated regression
    (float("nan"), 0.85, 0.0, False, "exact_match nan < current 0.850"),
])
def test_decide_compares_with_margin_and_ties(new, old, margin, wins, sentence):
    decision = decide(metrics(new), metrics(old), "exact_match", margin)
    assert decision.promote is wins
    assert sentence in decision.reason
    assert decision.reason.endswith("the candidate becomes current" if wins else "the current model stays")


def test_decide_uses_the_named_metric_and_promotes_without_a_current_model():
    assert decide(metrics(0.1, f1=0.9), metrics(0.9, f1=0.2), "f1", 0.0).promote is True
    assert decide(metrics(0.1, f1=0.9), metrics(0.9, f1=0.2), "exact_match", 0.0).promote is False
    first = decide(metrics(0.3), None, "anls", 0.1)
    assert first.promote and "no current model" in first.reason and "anls 0.600" in first.reason
    with pytest.raises(ConfigError, match="no number overall.anls .*have: exact_match"):
        decide({"overall": {"exact_match": 0.5}}, None, "anls", 0.0)


# ---------------------------------------------------------------------------------------------------
# The pointer in a local folder


def test_pointer_round_trip_previous_and_rollback(tmp_path):
    storage = tmp_path / "storage"
    a = model_folder(storage / "runs" / "demo-aaaaaaaa" / "merged", {"run_id": "demo-aaaaaaaa", "identity": "a" * 64})
    b = model_folder(storage / "runs" / "demo-bbbbbbbb" / "merged")
    assert read_current(str(storage), "demo") is None

    first = promote(str(storage), "demo", str(a), metrics(0.7), "exact_match",
                    {"run_id": "demo-aaaaaaaa", "identity": "a" * 64, "data": {"fingerprint": "f" * 64}}, reason="r1")
    assert read_current(str(storage), "demo") == first
    assert (storage / "demo" / POINTER).is_file()
    assert first["model"] == str(a) and first["previous"] is None and first["reason"] == "r1"
    assert first["metric"] == {"name": "exact_match", "value": 0.7} and first["metrics"] == metrics(0.7)
    assert first["run_id"] == "demo-aaaaaaaa" and first["lineage"]["data_fingerprint"] == "f" * 64
    assert datetime.fromisoformat(first["promoted_at"]).utcoffset().total_seconds() == 0

    second = promote(str(storage), "demo", str(b), None, "exact_match")
    assert second["previous"] == str(a) and second["metric"]["value"] is None
    back = promote(str(storage), "demo", str(a), metrics(0.7), "exact_match")  # a rollback
    assert back["previous"] == str(b) and read_current(str(storage), "demo")["model"] == str(a)
    again = promote(str(storage), "demo", str(a), metrics(0.7), "exact_match")  # current already: keeps what it replaced
    assert again["previous"] == str(b)
    assert sorted(p.name for p in (storage / "demo").iterdir()) == [POINTER]  # no temp file left behind
    assert b.is_dir() and (b / "config.json").is_file()  # a model no longer current stays where it was published


def test_a_candidate_compared_with_an_older_current_model_is_not_promoted(tmp_path):
    """Runs A and B both evaluate against no current model; A is promoted first. B never beat A, so it must
    not overwrite it (last writer wins, however it scored), and the pointer keeps A."""
    storage = str(tmp_path / "storage")
    a = model_folder(tmp_path / "storage" / "runs" / "demo-aaaaaaaa" / "merged")
    b = model_folder(tmp_path / "storage" / "runs" / "demo-bbbbbbbb" / "merged")
    promote(storage, "demo", str(a), metrics(0.9), "exact_match", compared_with=None)  # A: nothing was current
    with pytest.raises(CurrentChanged, match=rf"compared with no current model, and the pointer now names {a}"):
        promote(storage, "demo", str(b), metrics(0.5), "exact_match", compared_with=None)
    assert read_current(storage, "demo")["model"] == str(a)
    doc = promote(storage, "demo", str(b), metrics(0.95), "exact_match", compared_with=str(a))  # compared with A
    assert doc["model"] == str(b) and doc["previous"] == str(a)
    assert promote(storage, "demo", str(a), None, "exact_match")["model"] == str(a)  # by hand: no check


def test_concurrent_promotions_in_a_folder_are_one_after_the_other(tmp_path):
    """Eight threads each promote their own model, all having compared with the same current one: exactly one
    wins; the others are told the pointer moved (the lock holds the read and the write together)."""
    storage = str(tmp_path / "storage")
    base = model_folder(tmp_path / "storage" / "runs" / "base" / "merged")
    promote(storage, "demo", str(base), None, "exact_match")
    outcomes: list[str] = []

    def run(i: int) -> None:
        m = model_folder(tmp_path / "storage" / "runs" / f"m{i}" / "merged")
        try:
            promote(storage, "demo", str(m), metrics(0.5), "exact_match", compared_with=str(base))
            outcomes.append("promoted")
        except CurrentChanged:
            outcomes.append("refused")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["promoted"] + ["refused"] * 7
    assert read_current(storage, "demo")["previous"] == str(base)


def test_a_broken_pointer_is_an_error_naming_its_url(tmp_path):
    url = pointer_url(str(tmp_path), "demo")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / POINTER).write_text('{"schema_version": 1, "model": "s3://b/x", "metr')  # truncated
    with pytest.raises(PointerError, match=rf"{url} is not valid JSON"):
        read_current(str(tmp_path), "demo")
    (tmp_path / "demo" / POINTER).write_text('{"model": "s3://b/x"}')
    with pytest.raises(PointerError, match=rf"{url} is not a current-model pointer \(missing: schema_version, name"):
        read_current(str(tmp_path), "demo")


def test_a_folder_that_is_not_a_model_is_refused_and_the_pointer_stays(tmp_path):
    a = model_folder(tmp_path / "a")
    before = promote(str(tmp_path), "demo", str(a), metrics(0.5), "exact_match")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is not a model folder .no config.json there"):
        promote(str(tmp_path), "demo", str(tmp_path / "empty"), metrics(0.9), "exact_match")
    assert read_current(str(tmp_path), "demo") == before


def test_readers_never_see_a_partial_pointer_while_it_is_rewritten(tmp_path):
    """A reader loop against a writer that rewrites the pointer 400 times, each time with another length:
    every read is a whole document (a partial one would raise PointerError or lack its padding)."""
    url = pointer_url(str(tmp_path), "demo")
    base = {"schema_version": 1, "name": "demo", "model": "/m", "metric": {"name": "f1", "value": 0.5},
            "metrics": None, "promoted_at": "2026-01-01T00:00:00Z", "previous": None}
    def pad(n: int) -> str:
        return "x" * (n % 97) * 300

    write_pointer(url, {**base, "n": -1, "pad": pad(-1)})
    stop = threading.Event()
    seen: list[int] = []
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                doc = read_current(str(tmp_path), "demo")
                assert doc["pad"] == pad(doc["n"]), doc["n"]
                seen.append(doc["n"])
            except Exception as exc:  # noqa: BLE001 - collected, asserted below
                errors.append(repr(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(400):
            write_pointer(url, {**base, "n": n, "pad": pad(n)})
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert len(seen) > 20 and len(set(seen)) > 5  # the reader really ran alongside the writer
    assert read_current(str(tmp_path), "demo")["n"] == 399
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [POINTER]


def test_a_pointer_write_that_fails_leaves_the_old_pointer(tmp_path, monkeypatch):
    """The disk fails while the new pointer is being written (fsync raises): the old one is untouched."""
    a, b = model_folder(tmp_path / "a"), model_folder(tmp_path / "b")
    before = promote(str(tmp_path), "demo", str(a), metrics(0.5), "exact_match")
    raw = (tmp_path / "demo" / POINTER).read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        promote(str(tmp_path), "demo", str(b), metrics(0.9), "exact_match")
    monkeypatch.undo()
    assert (tmp_path / "demo" / POINTER).read_bytes() == raw
    assert read_current(str(tmp_path), "demo") == before
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [POINTER]


CRASH_SCRIPT = """
import sys
from vlm_core.promote import promote
from vlm_core.storage import upload_folder

local, storage, url = sys.argv[1:4]
upload_folder(local, url)                 # the candidate is published ...
print("published", flush=True)
sys.stdin.read()                          # ... and the process dies here, before the pointer is written
promote(storage, "demo", url, {"overall": {"exact_match": 1.0}}, "exact_match")
"""


@pytest.mark.integration
def test_a_crash_after_publishing_and_before_the_pointer_leaves_the_old_pointer(tmp_path):
    storage = tmp_path / "storage"
    old = model_folder(storage / "runs" / "demo-aaaaaaaa" / "merged")
    before = promote(str(storage), "demo", str(old), metrics(0.5), "exact_match")
    candidate = model_folder(tmp_path / "local-merged")
    (candidate / "model.safetensors").write_bytes(b"\0" * 4096)
    url = str(storage / "runs" / "demo-bbbbbbbb" / "merged")
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(candidate), str(storage), url],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "published"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    assert read_current(str(storage), "demo") == before  # the old pointer, whole and parseable
    assert is_complete(url)  # the candidate stays where it was published


# ---------------------------------------------------------------------------------------------------
# The pointer in S3 (a real moto_server)


def _bucket(name: str) -> None:
    fs = s3fs.S3FileSystem()
    if not fs.exists(name):
        fs.mkdir(name)


@pytest.mark.integration
def test_pointer_round_trip_in_s3(s3_server, tmp_path, capsys):
    _bucket("promote-bucket")
    storage = "s3://promote-bucket/store"
    local = model_folder(tmp_path / "merged", {"run_id": "demo-cccccccc", "metrics": metrics(0.8),
                                               "config": {"eval": {"metric": "anls"}}})
    upload_folder(local, f"{storage}/runs/demo-cccccccc/merged")
    assert read_current(storage, "demo") is None

    doc = promote(storage, "demo", f"{storage}/runs/demo-cccccccc/merged", metrics(0.8), "exact_match",
                  {"run_id": "demo-cccccccc"}, reason="exact_match 0.800 ≥ current 0.700 + margin 0.000")
    assert read_current(storage, "demo") == doc
    assert doc["lineage_url"] == f"{storage}/runs/demo-cccccccc/merged/lineage.json"
    assert read_model_metrics(doc["model"]) == metrics(0.8)

    assert main(["current", "--name", "demo", "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert f"current model of demo: {storage}/runs/demo-cccccccc/merged" in out and "exact_match 0.800" in out

    fs = s3fs.S3FileSystem()
    fs.pipe_file("promote-bucket/store/runs/demo-dddddddd/merged/config.json", b"{}")  # no checksum manifest
    with pytest.raises(ConfigError, match=f"has no {CHECKSUMS}: its upload is missing or incomplete"):
        promote(storage, "demo", f"{storage}/runs/demo-dddddddd/merged", None, "exact_match")
    assert read_current(storage, "demo") == doc

    fs.pipe_file("promote-bucket/store/demo/current.json", b'{"schema_version": 1, "na')
    with pytest.raises(PointerError, match=f"{storage}/demo/current.json is not valid JSON"):
        read_current(storage, "demo")
    assert main(["current", "--name", "demo", "--storage", "s3://no-such-promote-bucket/x"]) == 2
    assert "bucket 'no-such-promote-bucket' does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# vlmft current / vlmft promote


def test_cli_current_and_promote_by_hand(tmp_path, capsys):
    storage = tmp_path / "storage"
    storage.mkdir()
    lineage = {"run_id": "demo-aaaaaaaa", "identity": "a" * 64, "metrics": metrics(0.75, anls=0.66),
               "config": {"eval": {"metric": "anls"}}, "software": {"version": "0.1.0", "git_commit": "c" * 40}}
    a = model_folder(storage / "runs" / "demo-aaaaaaaa" / "merged", lineage)
    b = model_folder(storage / "runs" / "demo-bbbbbbbb" / "merged")

    assert main(["current", "--name", "demo", "--storage", str(storage)]) == 0
    assert "no current model of demo: nothing promoted yet" in capsys.readouterr().out

    assert main(["promote", "--name", "demo", "--storage", str(storage), "--model", str(a)]) == 0
    out = capsys.readouterr().out
    assert f"current model of demo is now {a} (anls 0.660)" in out  # the metric the model's run was configured with
    assert "it replaced: nothing (there was no current model)" in out

    config = tmp_path / "run.yaml"
    config.write_text(f"name: demo\nstorage:\n  url: {storage}\neval:\n  metric: f1\n")
    assert main(["promote", "--config", str(config), "--model", str(b)]) == 0
    out = capsys.readouterr().out
    assert f"is now {b} (no f1 recorded with it)" in out and f"it replaced: {a}" in out

    assert main(["current", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"current model of demo: {b}" in out and f"replaced: {a}" in out and "promoted by hand" in out
    assert main(["current", "--name", "demo", "--storage", str(storage), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == read_current(str(storage), "demo")

    assert main(["promote", "--name", "demo", "--storage", str(storage), "--model", str(a)]) == 0  # roll back
    capsys.readouterr()
    assert main(["current", "--name", "demo", "--storage", str(storage)]) == 0
    out = capsys.readouterr().out
    assert "anls 0.660" in out and "run demo-aaaaaaaa (identity aaaaaaaaaaaa)" in out and "commit cccccccccccc" in out


@pytest.mark.parametrize(("args", "message"), [
    (["promote", "--name", "demo", "--storage", "{s}", "--model", "{s}/runs"], "{s}/runs is not a model folder"),
    (["promote", "--name", "demo", "--storage", "{s}", "--model", "{s}/nowhere"], "{s}/nowhere is not a model folder"),
    (["current", "--storage", "{s}"], "current needs a run name: pass --name NAME"),
    (["current", "--name", "demo"], "current needs the storage: no --storage given"),
    (["current", "--name", "demo", "--storage", "{s}/typo"], "--storage {s}/typo: no such folder"),
    (["current", "--name", "demo", "--storage", "ftpx://host/x"], "unknown URL scheme 'ftpx://'"),
    (["current", "--name", "broken", "--storage", "{s}"], "{s}/broken/current.json is not valid JSON"),
])
def test_cli_mistakes_are_one_line_with_exit_code_2(tmp_path, capsys, args, message):
    storage = tmp_path / "storage"
    (storage / "runs").mkdir(parents=True)
    (storage / "broken").mkdir()
    (storage / "broken" / POINTER).write_text("{")
    assert main([a.replace("{s}", str(storage)) for a in args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlmft: ") and message.replace("{s}", str(storage)) in lines[0]
