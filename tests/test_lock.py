"""One writer per folder (vlm_core.lock): a second writer fails naming the holder, a dead holder's lock
is taken over (also when its PID was reused), registered PIDs keep a lock alive, only the owner
releases, URLs lock on this machine; uploads and shard writing never treat the lock file as data;
two real `vlmft train` runs on one output folder, and a SIGKILLed run's lock taken over on rerun."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from helpers import data as D
from helpers.servers import free_port
from tasks.process import process_tree
from vlm_core.lock import LOCK_NAME, FolderLock, LockHeld, lock_path, read_holder

HOST = socket.gethostname()
GONE_PID = 4_194_305  # above Linux's largest PID (2**22): never a running process


def _fake_holder(path: Path, pid: int, create_time: float, host: str = HOST) -> None:
    """A lock file as another process would have written it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"pid": pid, "create_time": create_time}
    path.write_text(json.dumps({"what": "training run", "target": str(path.parent), "pid": pid, "host": host,
                                "create_time": create_time, "started": "2025-01-01T00:00:00+00:00",
                                "command": "vlmft train --config old.yaml", "token": "theirs", "pids": [entry]}))


def _my_create_time() -> float:
    return psutil.Process().create_time()


def test_second_writer_fails_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with FolderLock(run, "training run") as lock:
        assert lock.path == run / LOCK_NAME and lock.took_over is None
        with pytest.raises(LockHeld) as err:
            FolderLock(run, "training run").acquire()
        msg = str(err.value)
        assert f"{run} is locked by another training run: PID {os.getpid()} on host {HOST}" in msg
        assert "command: " in msg and f"remove {run / LOCK_NAME}" in msg and "\n" not in msg
        assert read_holder(lock.path)["pids"] == [{"pid": os.getpid(), "create_time": _my_create_time()}]
    assert not (run / LOCK_NAME).exists()
    with pytest.raises(ValueError), FolderLock(run, "training run"):  # an exception releases it too
        raise ValueError
    assert not (run / LOCK_NAME).exists()


def test_reused_pid_is_a_dead_holder(tmp_path, caplog):
    """The holder's PID runs, but as a process with another create time: the PID was reused."""
    path = tmp_path / LOCK_NAME
    _fake_holder(path, os.getpid(), _my_create_time() - 1000)
    with caplog.at_level(logging.WARNING, logger="vlm_core.lock"), FolderLock(tmp_path, "training run") as lock:
        assert read_holder(path)["token"] != "theirs"
    assert f"took over the lock of a training run that is gone: PID {os.getpid()} on host {HOST}" in lock.took_over
    assert [r.getMessage() for r in caplog.records] == [lock.took_over]


def test_lock_of_another_host_or_unreadable_is_never_taken_over(tmp_path):
    _fake_holder(tmp_path / LOCK_NAME, GONE_PID, 1.0, host="elsewhere")
    with pytest.raises(LockHeld, match=f"PID {GONE_PID} on host elsewhere .*if that run is gone from host elsewhere"):
        FolderLock(tmp_path, "training run").acquire()
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(LockHeld, match="cannot be read"):
        FolderLock(tmp_path, "training run").acquire()


@pytest.mark.parametrize("round_", range(5))  # without the guard, most rounds see two winners
def test_take_over_is_race_free(tmp_path, round_):
    """Eight threads find one stale lock at once: exactly one takes it over, the others see it held."""
    _fake_holder(tmp_path / LOCK_NAME, GONE_PID, 1.0)
    start, results = threading.Barrier(8), []

    def contend() -> None:
        lock = FolderLock(tmp_path, "training run")
        start.wait()
        try:
            lock.acquire()
            results.append(lock)
        except LockHeld as exc:
            results.append(exc)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, FolderLock)]
    assert len(winners) == 1 and sum(isinstance(r, LockHeld) for r in results) == 7
    assert f"PID {GONE_PID}" in winners[0].took_over
    winners[0].release()


def test_release_and_add_pid_only_by_the_owner(tmp_path, caplog):
    lock = FolderLock(tmp_path, "training run").acquire()
    _fake_holder(lock.path, os.getpid(), _my_create_time())  # someone replaced our lock file
    with pytest.raises(LockHeld, match="no longer held by this process"):
        lock.add_pid(os.getppid())
    with caplog.at_level(logging.WARNING, logger="vlm_core.lock"):
        lock.release()
    assert read_holder(lock.path)["token"] == "theirs" and "no longer ours" in caplog.text
    lock.release()  # not held: nothing to do


def test_url_locks_live_in_the_lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMFT_LOCK_DIR", str(tmp_path / "locks"))
    url = "s3://bucket/runs/a/checkpoint-4"
    with FolderLock(url, "upload") as lock:
        assert lock.path.parent == tmp_path / "locks" and lock_path(url + "/") == lock.path
        with pytest.raises(LockHeld, match=f"^{url} is locked by another upload: PID {os.getpid()}"):
            FolderLock(url, "upload").acquire()
        with FolderLock("s3://bucket/runs/a/checkpoint-6", "upload"):  # another prefix: its own lock
            pass
    assert not lock.path.exists()


def test_uploads_skip_lock_files_and_take_one_per_prefix(tmp_path):
    from vlm_core.storage import CHECKSUMS, upload_folder

    src = tmp_path / "checkpoint-2"
    (src / "sub").mkdir(parents=True)
    (src / "model.bin").write_bytes(b"w" * 100)
    (src / "sub" / "state.json").write_text("{}")
    dest = tmp_path / "bucket" / "runs" / "r" / "checkpoint-2"
    with FolderLock(src, "training run"), FolderLock(src / "sub", "training run"):  # lock files in the upload
        report = upload_folder(src, str(dest))
    assert sorted(report.files) == ["model.bin", "sub/state.json"]
    assert sorted(json.loads((dest / CHECKSUMS).read_text())["files"]) == ["model.bin", "sub/state.json"]
    assert not (dest / LOCK_NAME).exists()  # the destination's own lock is gone after the upload
    for url in (str(dest), "s3://no-server-needed/runs/r/checkpoint-2"):  # the lock comes before any request
        with FolderLock(url, "upload"), pytest.raises(LockHeld, match="locked by another upload"):
            upload_folder(src, url)


def test_shard_writing_keeps_the_lock_file_and_a_second_writer_stops(tmp_path):
    from vlm_core.config import load_config
    from vlm_core.data.shards import begin, finalize, plan_shards, prepare_shards, write_group

    D.write_jsonl(tmp_path / "d" / "ann.jsonl", D.good_records(tmp_path / "d" / "images", 8))
    meta = D.make_meta(tmp_path, {"d": {"root": "d/images", "annotation": "d/ann.jsonl"}})
    shards = tmp_path / "shards"
    data = load_config(None, [f"data.meta={meta}", f"data.shards={shards}", "data.samples_per_shard=3",
                              "data.eval_count=2"]).data
    reference = prepare_shards(data)
    (shards / "manifest.json").unlink()
    with FolderLock(shards, "shard preparation"):
        with pytest.raises(LockHeld, match=f"{shards} is locked by another shard preparation: PID {os.getpid()}"):
            prepare_shards(data)
        plan = plan_shards(data)  # the steps themselves, under the lock: none of them touches the lock file
        begin(data)
        manifest = finalize(plan, [write_group(g, plan.datasets, data) for g in plan.groups], data)
        assert (shards / LOCK_NAME).is_file()
    assert manifest == reference and not (shards / LOCK_NAME).exists()
    assert sorted(p.name for p in shards.iterdir() if p.suffix == ".tar") == sorted(
        s.name for s in manifest.train.shards + manifest.eval.shards)


HOLD_SCRIPT = """
import subprocess, sys, time
from vlm_core.lock import FolderLock
lock = FolderLock(sys.argv[1], "training run").acquire()
if len(sys.argv) > 2:  # a launcher of its own session, registered with the lock
    child = subprocess.Popen(["sleep", "120"], start_new_session=True)
    lock.add_pid(child.pid)
    print(child.pid, flush=True)
print("locked", flush=True)
time.sleep(120)
"""


def _holder(folder: Path, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(folder), *extra], stdout=subprocess.PIPE,
                            text=True)
    lines = []
    while not lines or lines[-1] != "locked":
        line = proc.stdout.readline()
        assert line, "the holder exited before taking the lock"
        lines.append(line.strip())
    return proc, lines


@pytest.mark.integration
def test_lock_of_a_sigkilled_holder_is_taken_over(tmp_path, caplog):
    proc, _ = _holder(tmp_path)
    with pytest.raises(LockHeld, match=f"PID {proc.pid} on host {HOST}"):
        FolderLock(tmp_path, "training run").acquire()
    proc.kill()
    proc.wait()
    with caplog.at_level(logging.WARNING, logger="vlm_core.lock"), FolderLock(tmp_path, "training run") as lock:
        assert f"gone: PID {proc.pid} on host {HOST}" in lock.took_over
    assert caplog.records[-1].getMessage() == lock.took_over


@pytest.mark.integration
def test_registered_pid_keeps_the_lock_alive(tmp_path):
    """The process that took the lock is SIGKILLed, its launcher (another session) still runs: still locked."""
    proc, lines = _holder(tmp_path, "with-launcher")
    launcher = psutil.Process(int(lines[0]))
    proc.kill()
    proc.wait()
    with pytest.raises(LockHeld, match=rf"PID {proc.pid} on host {HOST} .*its processes \[{launcher.pid}\] still run"):
        FolderLock(tmp_path, "training run").acquire()
    launcher.kill()
    launcher.wait(10)
    with FolderLock(tmp_path, "training run") as lock:
        assert f"PID {proc.pid}" in lock.took_over


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_model_dir) -> Path:
    return D.training_shards(tmp_path_factory.mktemp("lock-data"), tiny_model_dir, 12, 6, 2)


@pytest.mark.integration
def test_two_train_runs_on_one_folder_and_a_sigkilled_run_resumed(prefect_server, tiny_model_dir, shards, tmp_path):
    from prefect.settings import PREFECT_API_URL

    out = tmp_path / "run"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}

    def vlmft_train(steps: int, log: str, out: Path = out) -> subprocess.Popen:
        args = ["name=locked", f"model.path={tiny_model_dir}", "model.dtype=float32", f"data.shards={shards}",
                "data.max_dynamic_patch=2", "data.num_workers=0", "data.shuffle_buffer=4", f"train.output_dir={out}",
                "train.launcher=python", "train.nproc_per_node=1", "train.deepspeed=none", "train.bf16=false",
                "train.per_device_batch_size=2", "train.logging_steps=1", "train.save_steps=2", "train.eval_steps=100",
                "train.save_total_limit=null", f"train.max_steps={steps}", f"train.master_port={free_port()}",
                "logging.report_to=[]"]
        return subprocess.Popen([Path(sys.executable).parent / "vlmft", "train", *args], env=env, text=True,
                                stdout=open(tmp_path / log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    first = vlmft_train(4, "first.log")
    while not (out / LOCK_NAME).exists():
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.1)
    started = time.time()
    second = vlmft_train(4, "second.log")
    assert second.wait(timeout=120) == 2
    assert time.time() - started < 60  # Python, Prefect and torch start-up: no retry after a held lock
    said = (tmp_path / "second.log").read_text()
    # naming the first run's PID proves it still held the lock, so both ran at once
    assert f"vlmft: {out} is locked by another training run: PID {first.pid} on host {HOST}" in said, said[-3000:]
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # one writer: every step once
    assert not (out / LOCK_NAME).exists()

    # the machine dies mid-training: every process of the run, SIGKILLed after a checkpoint (a 12-step run is
    # another run identity than the 4-step one above, so it gets a folder of its own)
    out = tmp_path / "run12"
    killed = vlmft_train(12, "killed.log", out)
    while not (out / "checkpoint-6" / "checkpoint_complete.json").exists():
        assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.05)
    tree = process_tree(killed.pid)
    for p in tree:
        p.send_signal(signal.SIGKILL)
    killed.wait()
    psutil.wait_procs(tree, timeout=30)
    holder = read_holder(out / LOCK_NAME)
    assert holder["pid"] == killed.pid and len(holder["pids"]) == 2  # the flow process and the launcher
    done = max(int(p.parent.name.split("-")[1]) for p in out.glob("checkpoint-*/checkpoint_complete.json"))
    assert done < 12

    rerun = vlmft_train(12, "rerun.log", out)
    assert rerun.wait(timeout=300) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    said = (tmp_path / "rerun.log").read_text()
    assert f"took over the lock of a training run that is gone: PID {killed.pid} on host {HOST}" in said, said[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["resumed_from"].endswith(f"checkpoint-{done}") and summary["global_step"] == 12
    assert not (out / LOCK_NAME).exists()
