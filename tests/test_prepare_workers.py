"""Shard groups in worker processes: the same bytes as one worker, errors that name the sample, no orphans."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest

from helpers import data as D
from vlm_core.config import DataConfig
from vlm_core.data.pool import process_pool
from vlm_core.data.sample import ShardSample
from vlm_core.data.shards import SampleError, _ShardFile, prepare_shards


@pytest.fixture
def meta(tmp_path) -> Path:
    D.write_jsonl(tmp_path / "a" / "ann.jsonl", D.good_records(tmp_path / "a" / "images", 40, "a"))
    records = D.good_records(tmp_path / "b" / "images", 10, "b")
    records[3]["conversations"][0]["weight"] = 0.5  # an extra turn key travels into the record
    D.write_jsonl(tmp_path / "b" / "ann.jsonl", records)
    return D.make_meta(tmp_path, {"a": {"root": "a/images", "annotation": "a/ann.jsonl", "repeat_time": 2},
                                  "b": {"root": "b/images", "annotation": "b/ann.jsonl", "max_dynamic_patch": 3}})


def _cfg(meta: Path, out: Path, **kw) -> DataConfig:
    return DataConfig(**{"meta": str(meta), "shards": str(out), "samples_per_shard": 7, "eval_fraction": 0.1, **kw})


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _pool_workers() -> list[psutil.Process]:
    """This process's pool workers: its spawned children (the resource tracker is not one)."""
    return [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]


def test_processes_write_the_same_bytes_as_one_worker(meta, tmp_path):
    one = prepare_shards(_cfg(meta, tmp_path / "one"), workers=1)
    procs = prepare_shards(_cfg(meta, tmp_path / "procs"), workers=2, pool="processes")
    threads = prepare_shards(_cfg(meta, tmp_path / "threads"), workers=3, pool="threads")
    assert one == procs == threads and len(one.train.shards) > 3
    files = _files(tmp_path / "one")
    assert files == _files(tmp_path / "procs") == _files(tmp_path / "threads")  # shards, manifest, rejected.jsonl
    assert not _pool_workers()  # the pool's workers are gone once the step ends
    with process_pool(_cfg(meta, tmp_path / "unused", prepare_workers=2)) as pool:
        assert pool.submit(abs, -1).result() == 1 and len(_pool_workers()) == 2  # what the check above sees


def test_records_are_shard_samples_and_tars_are_tarfiles(meta, tmp_path):
    manifest = prepare_shards(_cfg(meta, tmp_path / "s"), workers=2, pool="processes")
    weights = 0
    for s in manifest.train.shards + manifest.eval.shards:
        with tarfile.open(tmp_path / "s" / s.name) as tar:
            for m in tar.getmembers():
                assert (m.mode, m.uname, m.gname, m.mtime) == (0o444, "vlm", "vlm", 0)
                if m.name.endswith(".json"):
                    text = tar.extractfile(m).read().decode()
                    record = ShardSample.model_validate_json(text)  # the contract, and the same JSON back
                    dumped = record.model_dump(mode="json", by_alias=True)
                    assert json.loads(text) == dumped
                    weights += any("weight" in t for t in dumped["conversations"])
    assert weights  # the extra key was kept

    # the tar writer writes exactly what the standard library's tarfile writes for the same members
    sample = {"__key__": "k-000000001-000", "json": b'{"a":1}', "img0.jpg": b"\xff" * 1500, "img1.png": b""}
    (tmp_path / "t").mkdir()
    ours = _ShardFile(str(tmp_path / "t"), "x.tar")
    ours.add(sample)
    ours.add({**sample, "__key__": "k-000000002-000"})
    info = ours.commit()
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key in ("k-000000001-000", "k-000000002-000"):
            for name in sorted(k for k in sample if k != "__key__"):
                ti = tarfile.TarInfo(f"{key}.{name}")
                ti.size, ti.mode, ti.uname, ti.gname, ti.mtime = len(sample[name]), 0o444, "vlm", "vlm", 0
                tar.addfile(ti, io.BytesIO(sample[name]))
    assert (tmp_path / "t" / "x.tar").read_bytes() == ref.getvalue() and info.bytes == len(ref.getvalue())


def test_an_error_in_a_worker_names_file_line_and_field(meta, tmp_path):
    images = tmp_path / "a" / "images"
    lines = (tmp_path / "a" / "ann.jsonl").read_text().splitlines()
    rec = json.loads(lines[10])  # a single-image record (kind 0)
    os.remove(images / rec["image"])
    os.symlink(rec["image"], images / rec["image"])  # a symlink to itself: open() fails with ELOOP
    with pytest.raises(SampleError) as err:
        prepare_shards(_cfg(meta, tmp_path / "s"), workers=2, pool="processes")
    msg = str(err.value)
    assert f"{tmp_path / 'a' / 'ann.jsonl'} line 11" in msg and f"field image = {rec['image']!r}" in msg
    assert "Too many levels of symbolic links" in msg and "data set 'a'" in msg
    assert not _pool_workers()  # the failed step left no worker behind
    assert not (tmp_path / "s" / "manifest.json").exists()


RUN = """
import sys
from vlm_core.config import DataConfig
from vlm_core.data.shards import prepare_shards
prepare_shards(DataConfig(meta=sys.argv[1], shards=sys.argv[2], samples_per_shard=4, eval_fraction=0.0), workers=2,
               pool="processes")
"""


@pytest.mark.integration
@pytest.mark.parametrize("how", ["SIGKILL the process", "Ctrl-C in a terminal"])
def test_a_killed_or_interrupted_step_leaves_no_worker(tmp_path, how):
    recs = D.good_records(tmp_path / "d" / "images", 300)
    for r in recs:  # bigger images, so that the run lasts long enough to be stopped midway
        for p in ([r["image"]] if isinstance(r.get("image"), str) else r.get("image", [])):
            (tmp_path / "d" / "images" / p).write_bytes(D.jpeg(500, 400, seed=hash(p) % 1000))
    D.write_jsonl(tmp_path / "d" / "ann.jsonl", recs)
    meta = D.make_meta(tmp_path, {"d": {"root": "d/images", "annotation": "d/ann.jsonl"}})
    out = tmp_path / "shards"
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(meta), str(out)], start_new_session=True,
                            stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("*.tar*")):  # workers are writing
        time.sleep(0.02)
    family = parent.children(recursive=True)
    assert sum("spawn_main" in " ".join(p.cmdline()) for p in family) == 2, family  # the two workers
    if how == "SIGKILL the process":
        parent.kill()  # the process only, as an out-of-memory kill or a hard cancel would
    else:
        os.killpg(proc.pid, signal.SIGINT)  # a terminal sends Ctrl-C to the whole process group
    _, stderr = proc.communicate(timeout=60)
    gone, alive = psutil.wait_procs(family, timeout=15)
    assert not alive, f"left behind: {alive}"
    assert not (out / "manifest.json").exists()
    if how != "SIGKILL the process":
        assert proc.returncode != 0 and stderr.count("KeyboardInterrupt") == 1, stderr[-3000:]  # the parent's only


def test_workers_take_the_owner_environment_and_folder(tmp_path, monkeypatch):
    cfg = DataConfig(meta="unused", shards="unused", prepare_workers=2)
    with process_pool(cfg) as pool:  # an earlier pool in the same process
        assert pool.submit(abs, -1).result() == 1
    monkeypatch.setenv("VLMFT_TEST_MARK", "set after the first pool")  # e.g. storage credentials
    monkeypatch.chdir(tmp_path)
    with process_pool(cfg) as pool:
        assert pool.submit(os.getenv, "VLMFT_TEST_MARK").result() == "set after the first pool"
        assert pool.submit(os.getcwd).result() == str(tmp_path)


TRACKER_USER = """
import gc, multiprocessing, sys, time
from vlm_core.config import DataConfig
from vlm_core.data.pool import process_pool
queue = multiprocessing.get_context("spawn").Queue()  # someone else's semaphore, tracked before the pool
with process_pool(DataConfig(prepare_workers=2)):
    pass
del queue
gc.collect()  # its semaphore is unlinked and unregistered now, after the pool
time.sleep(0.5)
print("done")
"""


@pytest.mark.integration
def test_a_pool_leaves_a_resource_tracker_it_did_not_start_alone():
    """The pool leaves multiprocessing's resource tracker running: stopping it while other code's semaphores
    (a DataLoader's queues, or the pool's own, still referenced by a Prefect task's parameters) were
    registered made their later clean-up print a traceback."""
    run = subprocess.run([sys.executable, "-c", TRACKER_USER], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert run.returncode == 0 and run.stdout.strip() == "done", run.stderr
    assert "Traceback" not in run.stderr, run.stderr
