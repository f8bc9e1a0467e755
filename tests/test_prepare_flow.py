"""The prepare flow on a real Prefect server: shards, artifacts, no-op rerun, Dask task runner, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.prepare_data import prepare_data
from helpers import data as D
from helpers.flow_runs import flow_run_artifacts as _artifacts
from vlm_core.config import load_config

pytestmark = pytest.mark.integration  # the Prefect test server, Dask worker processes, the vlmft CLI


@pytest.fixture
def data_meta(tmp_path) -> Path:
    D.write_jsonl(tmp_path / "a" / "ann.jsonl", D.good_records(tmp_path / "a" / "images", 40, "a"))
    records, raw, _ = D.bad_dataset(tmp_path / "bad")
    D.write_jsonl(tmp_path / "bad" / "ann.jsonl", records[:4], raw)  # 4 image rejects + 2 broken lines
    return D.make_meta(tmp_path, {"a": {"root": "a/images", "annotation": "a/ann.jsonl"},
                                  "bad": {"root": "bad/images", "annotation": "bad/ann.jsonl"}})


@pytest.fixture(autouse=True)
def _tiny(tiny_model_dir):
    global TINY
    TINY = tiny_model_dir


def _cfg(meta: Path, out: Path, *extra: str):
    return load_config(None, [f"model.path={TINY}", f"data.meta={meta}", f"data.shards={out}", "data.samples_per_shard=6",
                              "data.eval_fraction=0.1", "data.max_reject_fraction=0.5", *extra])


def test_flow_writes_shards_and_reports(prefect_server, data_meta, tmp_path):
    cfg = _cfg(data_meta, tmp_path / "shards")
    state = prepare_data(cfg, return_state=True)
    out = state.result()
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert out["train_samples"] == manifest["train"]["samples"] > 0 and out["rejected"] == 6
    assert out["up_to_date"] is False
    arts = _artifacts(state.state_details.flow_run_id)
    rows = {r["dataset"]: r for r in json.loads(arts["prepare-datasets"].data)}
    assert rows["a"]["train"] + rows["a"]["eval"] == 40 and rows["bad"]["rejected"] == 6
    reasons = {r["reason"]: r["samples"] for r in json.loads(arts["prepare-rejects"].data)}
    assert reasons == manifest["rejected_by_reason"] and sum(reasons.values()) == 6
    assert arts["prepare-progress"].data == 100.0

    again = prepare_data(cfg, return_state=True)
    assert again.result()["up_to_date"] is True
    assert "prepare-progress" not in _artifacts(again.state_details.flow_run_id)


def test_same_flow_on_dask_gives_identical_shards(prefect_server, data_meta, tmp_path):
    from prefect_dask import DaskTaskRunner

    threads = prepare_data(_cfg(data_meta, tmp_path / "threads"))
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                            "dashboard_address": None})
    dask = prepare_data.with_options(task_runner=runner)(_cfg(data_meta, tmp_path / "dask"))
    assert dask == {**threads, "shards": str(tmp_path / "dask")}
    for name in json.loads((tmp_path / "threads" / "manifest.json").read_text())["train"]["shards"]:
        assert (tmp_path / "threads" / name["name"]).read_bytes() == (tmp_path / "dask" / name["name"]).read_bytes()


def test_cli_prepare_and_reject_limit(prefect_server, data_meta, tmp_path):
    from prefect.settings import PREFECT_API_URL

    vlmft = Path(sys.executable).parent / "vlmft"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the test server, not an ephemeral one
    args = [vlmft, "prepare", f"model.path={TINY}", f"data.meta={data_meta}", f"data.shards={tmp_path / 'cli'}", "data.samples_per_shard=6"]
    ok = subprocess.run([*args, "data.max_reject_fraction=0.5"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "shards written: " in ok.stdout and "(6 rejected" in ok.stdout
    bad = subprocess.run([*args, "data.max_reject_fraction=0.01"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert "6 of 46 samples rejected" in bad.stderr and "rejected.jsonl" in bad.stderr
