"""A user error is one `vlmft:` line with exit code 2: no traceback on the console, no retry, nothing
written where it does not belong; a failed training names its first failing rank; Ctrl-C stops
`vlmft run` within seconds and leaves no process.

The table runs `vlmft.cli.main` in this process against the session's Prefect test server (capfd
reads the console); the temporary-server cases run `python -m vlmft` as a real subprocess.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from helpers import data as D
from helpers.flow_runs import flow_run_logs
from helpers.servers import free_port
from tasks.errors import TrainingFailed, retry_unless_user_error, user_errors, worth_retrying
from tasks.process import ProcessFailed
from vlm_core.config import ConfigError, load_config
from vlm_core.data.shards import PrepareError, prepare_shards
from vlm_core.identity import IdentityMismatch
from vlm_core.lock import FolderLock, LockHeld
from vlm_core.progress import error_line, parse_error
from vlm_core.safe_load import UnsafeCheckpointError
from vlm_core.storage import StorageError, TransientStorageError
from vlmft.cli import main
from vlmft.terminal import WithoutUserErrorTraceback

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------
# The parts, without servers or processes


@pytest.mark.parametrize(("exc", "retry"), [
    (ConfigError("train.x=1"), False), (IdentityMismatch("another run"), False),
    (UnsafeCheckpointError("crafted"), False), (PrepareError("all rejected"), False), (LockHeld("held"), False),
    (StorageError("NoSuchBucket"), False), (TransientStorageError("endpoint unreachable"), True),
    (TrainingFailed("rank 1 raised ValueError"), False), (ProcessFailed("killed by SIGKILL"), True),
    (OSError("disk hiccup"), True), (ImportError("partly initialised module"), True),
])
def test_retry_only_what_may_pass_next_time(exc, retry):
    from prefect.states import Failed

    assert worth_retrying(exc) is retry
    assert retry_unless_user_error(None, None, Failed(data=exc)) is retry


def test_console_filter_drops_only_a_user_errors_traceback_and_leaves_the_record_intact(capsys):
    logger = logging.getLogger("test-user-errors-console")
    logger.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(WithoutUserErrorTraceback(console, user_errors()))
    kept: list[logging.LogRecord] = []
    keeper = logging.Handler()
    keeper.emit = kept.append
    logger.handlers = [keeper, console]  # the run log's handler formats first, like Prefect's API handler
    try:
        for exc in (ConfigError("data.meta=x.json does not exist"), KeyError("bug")):
            try:
                raise exc
            except Exception:
                logger.error("Task run failed with exception: %r", exc, exc_info=True)
    finally:
        logger.handlers = []
    err = capsys.readouterr().err
    assert "Task run failed with exception: ConfigError('data.meta=x.json does not exist')\n" in err
    assert err.count("Traceback") == 1 and "KeyError: 'bug'" in err  # a bug keeps its traceback
    assert all(r.exc_info for r in kept)  # the other handler saw both exceptions


def test_a_ranks_error_line_round_trips(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    line = error_line(ValueError("bad\n  value"))
    assert line == "VLMFT_ERROR rank=3: ValueError: bad value"
    assert parse_error("[default3]:" + line) == (3, "ValueError: bad value")  # a launcher's prefix is fine
    assert parse_error("VLMFT_PROGRESS {}") is None and parse_error("VLMFT_ERROR rank=x: y") is None


# ---------------------------------------------------------------------------------------------------
# The table: `vlmft` in this process


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir) -> dict:
    """Good data and shards; bad data; a copy of the tiny model whose weights file is cut short (its
    config, tokenizer and identity are fine: only loading the weights in the ranks fails)."""
    root = tmp_path_factory.mktemp("user-errors")
    D.write_jsonl(root / "d" / "ann.jsonl", D.good_records(root / "d" / "images", 12))
    meta = D.make_meta(root, {"d": {"root": "d/images", "annotation": "d/ann.jsonl"}})
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.meta={meta}", f"data.shards={root / 'shards'}",
                             "data.samples_per_shard=6", "data.eval_count=2", "data.max_dynamic_patch=2"])
    prepare_shards(cfg.data, model=cfg.model)
    records, raw, _ = D.bad_dataset(root / "bad")
    D.write_jsonl(root / "bad" / "ann.jsonl", records, raw)
    bad_meta = root / "bad" / "meta.json"
    bad_meta.write_text(json.dumps({"bad": {"root": "images", "annotation": "ann.jsonl"}}))
    broken = root / "truncated-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return {"root": root, "model": tiny_model_dir, "meta": meta, "shards": root / "shards", "bad_meta": bad_meta,
            "broken_model": broken}


def _train_args(x: dict, out: Path, *extra: str) -> list[str]:
    return ["train", "name=errors", f"model.path={x['model']}", "model.dtype=float32", f"data.shards={x['shards']}",
            "data.max_dynamic_patch=2", "data.num_workers=0", f"train.output_dir={out}", "train.max_steps=2",
            "train.per_device_batch_size=2", "train.bf16=false", "train.deepspeed=none", "train.nproc_per_node=2",
            f"train.master_port={free_port()}", "logging.report_to=[]", *extra]


def _launches(out: Path) -> int:
    log = out / "train.log"
    return sum(line.startswith("$ ") for line in log.read_text().splitlines()) if log.is_file() else 0


@dataclass
class Case:
    id: str
    argv: Callable[[dict, Path], list[str]]  # (inputs, this case's folder) -> the command line
    says: list[str]  # substrings of the one `vlmft:` line
    check: Callable[[dict, Path], None] = lambda x, tmp: None  # what must not have happened
    around: Callable[[dict, Path], object] | None = None  # a context manager to run the command in
    flow: str | None = None  # the flow whose run log must keep the full traceback


def _no_shards(x, tmp):
    assert not (tmp / "shards").exists()


def _no_manifest(x, tmp):
    assert not (tmp / "shards" / "manifest.json").exists() and (tmp / "shards" / "rejected.jsonl").is_file()


def _not_launched(x, tmp):
    assert _launches(tmp / "out") == 0 and not (tmp / "out" / "run.json").exists()


def _launched_once(x, tmp):
    assert _launches(tmp / "out") == 1  # no retry: the launcher ran once
    log = (tmp / "out" / "train.log").read_text()
    assert "Traceback" in log and "VLMFT_ERROR rank=" in log  # the full story stays in the run's log


def _nothing_merged(x, tmp):
    assert not (tmp / "out" / "merged").exists()


def _nothing_prepared_or_launched(x, tmp):
    _no_shards(x, tmp)
    _not_launched(x, tmp)


@contextlib.contextmanager
def _half_uploaded_adapter(tmp: Path):
    """An adapter folder in storage whose upload never finished: files, but no checksum manifest."""
    (tmp / "half-uploaded").mkdir()
    (tmp / "half-uploaded" / "adapter_config.json").write_text("{}")
    yield


@contextlib.contextmanager
def _adapter_without_base(tmp: Path):
    """A LoRA adapter folder whose adapter_config.json names a base model that is not there."""
    (tmp / "adapter").mkdir()
    (tmp / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp / "gone")}))
    yield


CASES = [
    Case("unknown-key", lambda x, tmp: ["config", "train.lerning_rate=1"], ["lerning_rate"]),
    Case("prepare-meta-missing",
         lambda x, tmp: ["prepare", f"model.path={x['model']}", f"data.meta={tmp / 'none.json'}",
                         f"data.shards={tmp / 'shards'}"],
         ["none.json does not exist"], _no_shards, flow="prepare-data"),
    Case("prepare-everything-rejected",
         lambda x, tmp: ["prepare", f"model.path={x['model']}", f"data.meta={x['bad_meta']}",
                         f"data.shards={tmp / 'shards'}", "data.max_dynamic_patch=2"],
         ["samples rejected", "data.max_reject_fraction", "rejected.jsonl"], _no_manifest),
    Case("train-no-shards", lambda x, tmp: _train_args(x, tmp / "out", f"data.shards={tmp / 'none'}"),
         ["no manifest.json", "vlmft prepare"], _not_launched, flow="train"),
    Case("train-folder-locked", lambda x, tmp: _train_args(x, tmp / "out"),
         ["is locked by another training run", f"PID {os.getpid()}"], _not_launched,
         around=lambda x, tmp: FolderLock(tmp / "out", "training run")),
    Case("train-rank-fails", lambda x, tmp: _train_args(x, tmp / "out", f"model.path={x['broken_model']}"),
         ["training failed: rank ", " raised ", "the full traceback is in", "train.log"], _launched_once),
    Case("merge-no-checkpoint",
         lambda x, tmp: ["merge", f"model.path={x['model']}", "lora.enabled=true", f"train.output_dir={tmp / 'out'}",
                         f"data.shards={tmp / 'none'}"],
         ["no complete checkpoint", "--adapter"], _nothing_merged),
    Case("merge-adapter-upload-incomplete",
         lambda x, tmp: ["merge", f"model.path={x['model']}", "lora.enabled=true", f"train.output_dir={tmp / 'out'}",
                         f"data.shards={tmp / 'none'}", "--adapter", f"file://{tmp / 'half-uploaded'}"],
         ["SHA256SUMS.json", "missing or incomplete"], _nothing_merged,
         around=lambda x, tmp: _half_uploaded_adapter(tmp)),
    Case("run-meta-missing",
         lambda x, tmp: ["run", f"model.path={x['model']}", f"data.meta={tmp / 'none.json'}",
                         f"data.shards={tmp / 'shards'}", f"train.output_dir={tmp / 'out'}", "train.bf16=false"],
         ["none.json does not exist"], _nothing_prepared_or_launched, flow="finetune"),
    Case("predict-image-missing",
         lambda x, tmp: ["predict", "--model", str(x["model"]), "--image", str(tmp / "none.jpg"), "--prompt", "Q?"],
         ["--image", "none.jpg does not exist"]),
    Case("predict-not-a-model", lambda x, tmp: ["predict", "--model", str(x["root"] / "d"), "--prompt", "Q?"],
         ["is not a model", "adapter_config.json"]),
    Case("predict-adapter-base-missing",
         lambda x, tmp: ["predict", "--model", str(tmp / "adapter"), "--prompt", "Q?"],
         ["LoRA adapter ", "gone (from its adapter_config.json base_model_name_or_path)", "--base"],
         around=lambda x, tmp: _adapter_without_base(tmp)),
]


def _latest_flow_run(name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the run's log lines are sent in the background
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=1)[0]


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_user_error_is_one_line(case: Case, inputs, prefect_server, console, tmp_path):
    console.bind()
    with case.around(inputs, tmp_path) if case.around else contextlib.nullcontext():
        rc = main(case.argv(inputs, tmp_path))
    out, err = console.readouterr()
    said = [line for line in (out + err).splitlines() if line.startswith("vlmft:")]
    assert rc == 2, out + err
    assert len(said) == 1 and err.rstrip().splitlines()[-1] == said[0], out + err
    for text in case.says:
        assert text in said[0], said[0]
    assert "Traceback" not in out + err and "ChildFailedError" not in out + err, err
    assert "Retry 1/" not in out + err  # deterministic: no task retried it
    case.check(inputs, tmp_path)
    if case.flow:  # the traceback went to the run's log in Prefect instead of the console
        run = _latest_flow_run(case.flow)
        assert run.state.is_failed() and any("Traceback" in m for m in flow_run_logs(run.id))


@pytest.mark.integration
def test_deploy_says_what_to_do_next_once(prefect_server, console, tmp_path):
    console.bind()
    rc = main(["deploy", "--pool", "user-errors-pool", "name=deploy-advice", f"train.output_dir={tmp_path}"])
    out, err = console.readouterr()
    assert rc == 0, out + err
    assert "process work pool" not in out + err  # Prefect's advice, once per deployment, is not shown
    assert (out + err).count("prefect worker start --pool user-errors-pool") == 1


# ---------------------------------------------------------------------------------------------------
# Real `vlmft` processes on a temporary Prefect server


def _vlmft_env(tmp: Path) -> dict[str, str]:
    """No PREFECT_API_URL (a temporary server), Prefect's state under `tmp`, none of our Prefect defaults
    preset (the CLI sets them), and this checkout's code first."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED",
                        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")}
    return {**env, "PREFECT_HOME": str(tmp / "prefect-home"), "PYTHONPATH": str(ROOT),
            "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true"}


@pytest.mark.integration
def test_temporary_server_user_error_is_one_line_without_telemetry(tmp_path, tiny_model_dir):
    res = subprocess.run([sys.executable, "-m", "vlmft", "prepare", f"model.path={tiny_model_dir}",
                          f"data.meta={tmp_path / 'none.json'}", f"data.shards={tmp_path / 'shards'}"],
                         env=_vlmft_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    console = res.stdout + res.stderr
    assert res.returncode == 2, console
    assert "Starting temporary server" in console  # the case this test is about
    said = [line for line in console.splitlines() if line.startswith("vlmft:")]
    assert said == [f"vlmft: data.meta={tmp_path / 'none.json'} does not exist"], console
    assert "Traceback" not in console and "telemetry" not in console.lower(), console


def _command(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:  # gone, or a zombie not yet reaped
        return ""


@pytest.mark.integration
def test_ctrl_c_stops_vlmft_run_within_seconds_and_leaves_no_process(tmp_path, tiny_model_dir):
    from vlm_core.demo import write_demo_data

    meta = write_demo_data(tmp_path / "data", n=32)
    log = tmp_path / "vlmft.log"
    with open(log, "w") as f:  # a session of its own: its process group is what a terminal's Ctrl-C reaches
        vlmft = subprocess.Popen(
            [sys.executable, "-m", "vlmft", "run", "--config", str(ROOT / "configs" / "demo.yaml"),
             f"model.path={tiny_model_dir}", f"data.meta={meta}", f"data.shards={tmp_path / 'shards'}",
             "data.eval_count=8", f"train.output_dir={tmp_path / 'train'}", "storage.url=", "logging.report_to=[]",
             "train.max_steps=5000", "train.save_steps=10000", "train.eval_steps=10000", "train.eval_on_start=false",
             f"train.master_port={free_port()}"],
            env=_vlmft_env(tmp_path), stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.time() + 400
        while not (tmp_path / "train" / "metrics.jsonl").exists():  # training is under way
            assert vlmft.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        tree = [psutil.Process(vlmft.pid), *psutil.Process(vlmft.pid).children(recursive=True)]
        commands = [_command(p) for p in tree]
        assert any("uvicorn" in c for c in commands) and sum("vlm_core.train" in c for c in commands) >= 2, commands
        interrupted = time.time()
        os.killpg(vlmft.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        rc = vlmft.wait(timeout=60)
        took = time.time() - interrupted
        _, alive = psutil.wait_procs(tree, timeout=1)
        # multiprocessing's resource tracker (started for the prepare step's process pool) exits once vlmft has
        # gone; orphaned, it stays a zombie where PID 1 never reaps, as in this container: exited, holding nothing
        alive = [p for p in alive if _status(p) not in (psutil.STATUS_ZOMBIE, None)]
        said = log.read_text()
        assert took < 15, f"vlmft took {took:.0f} s to stop after Ctrl-C\n{said[-3000:]}"
        assert alive == [], f"left running: {[_command(p) for p in alive]}"
        assert rc == 130 and "\nvlmft: interrupted\n" in said and "Traceback" not in said, said[-3000:]
    finally:
        if vlmft.poll() is None:
            os.killpg(vlmft.pid, signal.SIGKILL)
            vlmft.wait()


def _status(p: psutil.Process) -> str | None:
    try:
        return p.status()
    except psutil.NoSuchProcess:
        return None
