"""Several nodes from one flow run: DeepSpeed's hostfile runner over a real sshd, two "nodes" that are two
names of this machine (`localhost`, `127.0.0.1`), node 1 with a disk of its own (tests/helpers/sshd.py),
so checkpoints meet only in storage. The hostfile checks run without any of that."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import data as D
from helpers.servers import free_port
from helpers.sshd import Sshd, missing_tools
from vlm_core.config import ConfigError, FinetuneConfig, load_config, to_json
from vlm_core.launch import check_launch, world_size
from vlm_core.multinode import MARKER_ARG, parse_hostfile, split_host
from vlm_core.progress import ProgressEvent, parse

HOSTS = ["localhost slots=1", "127.0.0.1 slots=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_model_dir) -> Path:
    return D.training_shards(tmp_path_factory.mktemp("mn-data"), tiny_model_dir, 20, 6, 4)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    missing = missing_tools()
    if missing:  # a clear failure, not a silent skip: `make test` installs them (make system-deps)
        pytest.fail(f"these tests need {', '.join(missing)}: run `make system-deps` as root "
                    "(apt-get install openssh-server pdsh)")
    server = Sshd(tmp_path_factory.mktemp("sshd")).start()
    old = os.environ.get("PDSH_SSH_ARGS_APPEND")
    os.environ.update(server.ssh_env())  # what the worker's user would put in ~/.ssh/config
    yield server
    if old is None:
        os.environ.pop("PDSH_SSH_ARGS_APPEND", None)
    else:
        os.environ["PDSH_SSH_ARGS_APPEND"] = old
    server.stop()


def _cfg(tiny_model_dir, shards, out: Path, storage: Path, port: int | None = None, *extra: str) -> FinetuneConfig:
    return load_config(None, [
        "name=mn", f"model.path={tiny_model_dir}", "model.dtype=float32", f"data.shards={shards}",
        "data.max_dynamic_patch=2", "data.num_workers=1", "data.shuffle_buffer=8", f"train.output_dir={out}",
        "train.per_device_batch_size=2", "train.learning_rate=3e-3", "train.warmup_ratio=0", "train.bf16=false",
        "train.lr_scheduler=constant", "train.logging_steps=1", "train.save_steps=3", "train.eval_steps=100",
        "train.max_steps=6", "train.deepspeed=zero2", "train.save_total_limit=null",
        "train.launcher=deepspeed", f"train.hostfile={json.dumps(HOSTS)}", f"train.master_port={free_port()}",
        f"train.ssh_port={port or 22}", "train.shared_output_dir=false", f"storage.url={storage}",
        "logging.report_to=[]", "eval.enabled=false", *extra])


# --- the hostfile, checked before anything starts (no processes) ---

def test_hostfile_lines_are_checked_naming_the_line(tiny_model_dir, tmp_path):
    assert parse_hostfile(["# nodes", "", "node1 slots=8", "node2  slots=4"]) == {"node1": 8, "node2": 4}
    with pytest.raises(ConfigError, match=r"train.hostfile line 2: 'node2 8' is not `HOST slots=N`"):
        parse_hostfile(["node1 slots=8", "node2 8"])
    with pytest.raises(ConfigError, match="line 2: node1 is listed twice"):
        parse_hostfile(["node1 slots=8", "node1 slots=2"])
    with pytest.raises(ConfigError, match="line 1: node1 has slots=0"):
        parse_hostfile(["node1 slots=0"])
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=2\nb slots=3\nc slots=1\n")
    base = ["train.launcher=deepspeed", "train.deepspeed=none", f"model.path={tiny_model_dir}", "train.master_addr=10.0.0.1"]
    assert world_size(load_config(None, [*base, f"train.hostfile={hostfile}"])) == 6
    assert world_size(load_config(None, [*base, f"train.hostfile={hostfile}", "train.exclude=b"])) == 3
    assert world_size(load_config(None, [*base, f"train.hostfile={hostfile}", "train.include=a:0@c"])) == 2
    with pytest.raises(ConfigError, match="train.include=zz: .*a, b, c"):
        check_launch(load_config(None, [*base, f"train.hostfile={hostfile}", "train.include=zz"]))
    with pytest.raises(ConfigError, match="train.master_addr=127.0.0.1 is this node's loopback"):
        check_launch(load_config(None, [*base[:-1], f"train.hostfile={hostfile}"]))
    with pytest.raises(ConfigError, match="train.hostfile=.*nope: no such file"):
        check_launch(load_config(None, [*base, f"train.hostfile={tmp_path / 'nope'}"]))
    with pytest.raises(ConfigError, match="train.shared_output_dir=false: .*set storage.url"):
        check_launch(load_config(None, [*base, f"train.hostfile={hostfile}", "train.shared_output_dir=false"]))


def test_events_are_read_behind_pdshs_host_prefix():
    event = ProgressEvent("step", {"step": 3})
    host, rest = split_host(f"127.0.0.1: {event.line()}")
    assert host == "127.0.0.1" and parse(rest) == event
    assert split_host("pdsh@head: 127.0.0.1: ssh exited with exit code 255")[0] is None
    assert split_host("[2026-01-01 00:00:00,000] [INFO] [runner.py:1] cmd = pdsh")[0] is None


# --- real nodes over ssh ---

FLOW_SCRIPT = """
import sys
from flows.train import train
from vlm_core.config import from_json
train(from_json(open(sys.argv[1]).read()))
"""


def _flow_in_subprocess(cfg: FinetuneConfig, folder: Path) -> subprocess.Popen:
    """The flow in a process of its own, reporting to the session's Prefect server, as a worker runs it."""
    from prefect.settings import PREFECT_API_URL

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(to_json(cfg))
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.Popen([sys.executable, "-c", FLOW_SCRIPT, str(folder / "cfg.json")], env=env,
                            stdout=open(folder / "flow.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _launch_processes(sshd: Sshd) -> list[psutil.Process]:
    """Every process under the test's sshd (the nodes' shells, launchers, ranks, DataLoader workers) and every
    process that carries a launch marker anywhere."""
    found = {p.pid: p for p in psutil.Process(sshd.proc.pid).children(recursive=True)}
    for p in psutil.process_iter(["cmdline"]):
        if any(a.startswith(MARKER_ARG) for a in (p.info["cmdline"] or [])):
            found[p.pid] = p
    return list(found.values())


def _rank_ids(samples: Path, steps_per_epoch: int) -> list[str]:
    rows = [json.loads(x) for x in samples.read_text().splitlines()]
    return [i for r in rows if r["step"] < steps_per_epoch for i in r["ids"]]


def _node1(sshd: Sshd, folder: Path) -> Path:
    """What node 1 sees at `folder`, on its own disk."""
    return Path(f"{sshd.node1_root}{folder}")


@pytest.fixture(scope="module")
def unbroken(prefect_server, sshd, tiny_model_dir, shards, tmp_path_factory):
    """One complete 2-node run through the train flow, node 1 on its own disk; its summary and folders."""
    from flows.train import train

    root = tmp_path_factory.mktemp("mn-unbroken")
    out, storage = root / "out", root / "storage"
    sshd.binds.write_text(f"{out}\n")
    t0 = time.time()
    state = train(_cfg(tiny_model_dir, shards, out, storage, sshd.port), return_state=True)
    return {"summary": state.result(), "out": out, "storage": storage, "seconds": time.time() - t0,
            "flow_run_id": state.state_details.flow_run_id}


@pytest.mark.integration
def test_two_nodes_over_ssh_train_disjoint_samples_and_checkpoint_completely_in_storage(unbroken, sshd):
    from helpers.flow_runs import flow_run_logs

    s, out = unbroken["summary"], unbroken["out"]
    assert s["world_size"] == 2 and s["global_step"] == 6
    node1 = _node1(sshd, out)
    # each node wrote into its own folder: rank 0's samples on the head node, rank 1's on node 1's disk
    assert (out / "samples" / "rank0.jsonl").is_file() and not (out / "samples" / "rank1.jsonl").exists()
    r0, r1 = _rank_ids(out / "samples" / "rank0.jsonl", 4), _rank_ids(node1 / "samples" / "rank1.jsonl", 4)
    assert len(r0) == len(r1) == 8 and not set(r0) & set(r1)  # 16 samples, 4 steps per epoch: disjoint halves
    assert not (out / "checkpoint-6" / "global_step6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()
    assert not (node1 / "checkpoint-6" / "global_step6" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").exists()
    # ... and met in storage: complete, with both ranks' partitions and RNG states, a marker per rank
    run = unbroken["storage"] / "runs" / s["run_id"]
    for step in (3, 6):
        files = json.loads((run / f"checkpoint-{step}" / "SHA256SUMS.json").read_text())["files"]
        for rank in (0, 1):
            assert f"global_step{step}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
            assert f"rng_state_{rank}.pth" in files
            assert (run / f"checkpoint-{step}" / ".ranks" / f"rank{rank}.json").is_file()
        assert {"checkpoint_complete.json", "trainer_state.json", "latest",
                f"global_step{step}/mp_rank_00_model_states.pt"} <= set(files)
    logs = flow_run_logs(unbroken["flow_run_id"])
    assert any(m.startswith("step 6/6") for m in logs)  # rank 0's progress events, read behind "localhost: "
    assert any(m.startswith("127.0.0.1: ") and "Warning" in m for m in logs)  # node 1's warnings, named
    assert not (out / ".deepspeed_env").exists()  # it may hold credentials: gone after the run
    assert _launch_processes(sshd) == []


@pytest.mark.integration
def test_two_nodes_lora_zero2_checkpoint_holds_both_ranks_and_the_adapter(prefect_server, sshd, tiny_model_dir, shards,
                                                                        tmp_path):
    """The issue's own case: 2 nodes x 1 process, ZeRO-2, LoRA, no shared folder; run again on fresh disks and
    storage, the same config trains to the same losses (the adapters start from train.seed on both nodes)."""
    from flows.train import train

    out, storage = tmp_path / "out", tmp_path / "storage"
    sshd.binds.write_text(f"{out}\n{tmp_path / 'again'}\n")
    cfg = _cfg(tiny_model_dir, shards, out, storage, sshd.port, "lora.enabled=true", "lora.r=4",
               "train.max_steps=4", "train.save_steps=4")
    s = train(cfg, return_state=True).result()
    assert s["world_size"] == 2 and s["global_step"] == 4
    r0 = _rank_ids(out / "samples" / "rank0.jsonl", 4)
    r1 = _rank_ids(_node1(sshd, out) / "samples" / "rank1.jsonl", 4)
    assert len(r0) == len(r1) == 8 and not set(r0) & set(r1)
    ck = storage / "runs" / s["run_id"] / "checkpoint-4"
    files = json.loads((ck / "SHA256SUMS.json").read_text())["files"]
    assert {"adapter_model.safetensors", "adapter_config.json", "checkpoint_complete.json"} <= set(files)
    assert "model.safetensors" not in files  # adapter-only: the base weights stay where they are
    for rank in (0, 1):
        assert f"global_step4/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
        assert f"rng_state_{rank}.pth" in files
    assert _launch_processes(sshd) == []
    again = _cfg(tiny_model_dir, shards, tmp_path / "again", tmp_path / "storage-again", sshd.port, "lora.enabled=true",
                 "lora.r=4", "train.max_steps=4", "train.save_steps=4")
    s2 = train(again)
    assert s2["resumed_from"] is None and s2["losses"] == s["losses"] and len(s["losses"]) == 4


def _ranks_by_node(procs: list[psutil.Process]) -> dict[str, list[int]]:
    """{mount namespace: rank PIDs}: node 1's ranks run in a mount namespace of their own (its own disk)."""
    found: dict[str, list[int]] = {}
    for p in procs:
        try:
            cmd = " ".join(p.cmdline())
            if "-m vlm_core.train" in cmd and "deepspeed.launcher" not in cmd:
                found.setdefault(os.readlink(f"/proc/{p.pid}/ns/mnt"), []).append(p.pid)
        except (psutil.NoSuchProcess, FileNotFoundError):
            pass
    return found


@pytest.mark.integration
def test_cancel_ends_every_node_and_a_rerun_resumes_on_fresh_disks(unbroken, sshd, tiny_model_dir, shards, tmp_path):
    """Cancel the flow run after its first checkpoint is complete in storage: no process is left on either
    node. Both nodes' disks are then lost; the rerun fetches each node's files from storage and continues
    with the unbroken run's losses."""
    out, storage = tmp_path / "out", tmp_path / "storage"
    sshd.binds.write_text(f"{out}\n")
    cfg = _cfg(tiny_model_dir, shards, out, storage, sshd.port)
    # a checkpoint at every step (the save cadence is not part of the run identity): the cancel lands mid-run
    broken = cfg.model_copy(update={"train": cfg.train.model_copy(update={"save_steps": 1})})
    flow = _flow_in_subprocess(broken, tmp_path / "flow")
    run = storage / "runs" / unbroken["summary"]["run_id"]
    deadline = time.time() + 180
    while time.time() < deadline and not list(run.glob("checkpoint-*/SHA256SUMS.json")):
        assert flow.poll() is None, (tmp_path / "flow" / "flow.log").read_text()[-3000:]
        time.sleep(0.1)
    procs = _launch_processes(sshd)
    assert len(_ranks_by_node(procs)) == 2, [p.cmdline() for p in procs]  # ranks running on both nodes
    flow.send_signal(signal.SIGTERM)  # what a Prefect worker does on cancel
    flow.wait(timeout=60)
    _, alive = psutil.wait_procs(procs, timeout=20)
    assert alive == [], f"processes survived the cancel: {[(p.pid, p.cmdline()) for p in alive]}"
    assert _launch_processes(sshd) == []  # every PID under sshd is gone, and nothing of the launch elsewhere
    assert not (out / "run_summary.json").exists()  # it was cancelled mid-run
    shutil.rmtree(out)  # both nodes' disks are lost
    shutil.rmtree(sshd.node1_root)

    from flows.train import train

    s = train(cfg)
    done = int(s["resumed_from"].rsplit("-", 1)[1])
    assert 1 <= done < 6 and s["global_step"] == 6 and s["world_size"] == 2
    reference = unbroken["summary"]["losses"]
    for step in range(done + 1, 7):
        assert abs(s["losses"][str(step)] - reference[str(step)]) < 1e-4, (step, s["losses"], reference)


# --- the per-rank upload protocol on plain folders (no processes) ---

def _checkpoint(folder: Path, ranks: int) -> Path:
    (folder / "global_step3").mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    (folder / "global_step3" / "mp_rank_00_model_states.pt").write_bytes(b"model")
    for r in range(ranks):
        (folder / "global_step3" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(f"optim {r}".encode())
        (folder / f"rng_state_{r}.pth").write_bytes(f"rng {r}".encode())
    return folder


def test_a_checkpoint_is_complete_once_every_rank_of_the_launch_uploaded(tmp_path):
    from vlm_core.rank_checkpoints import fetch_own_files, file_owner, publish_rank_files, rank_files

    node0 = _checkpoint(tmp_path / "node0" / "checkpoint-3", 2)
    node1 = _checkpoint(tmp_path / "node1" / "checkpoint-3", 2)
    assert rank_files(node1, 1) == ["global_step3/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_state_1.pth"]
    assert file_owner("trainer_state.json") is None and file_owner("rng_state_0.pth") == 0
    base = str(tmp_path / "storage")
    url = f"{base}/checkpoint-3"
    assert not publish_rank_files(node1, base, 1, 2, "old-launch")  # a launch that was killed before rank 0 uploaded
    assert not publish_rank_files(node0, base, 0, 2, "new")  # rank 1's marker is the old launch's: not complete
    assert not (tmp_path / "storage" / "checkpoint-3" / "SHA256SUMS.json").exists()
    assert publish_rank_files(node1, base, 1, 2, "new")  # the last rank of the launch completes it
    files = json.loads((tmp_path / "storage" / "checkpoint-3" / "SHA256SUMS.json").read_text())["files"]
    assert set(files) == set(rank_files(node0, 0)) | set(rank_files(node1, 1))
    # a fresh node 1 fetches the shared files and its own rank's, not rank 0's partition
    fresh = tmp_path / "fresh1" / "checkpoint-3"
    fetch_own_files(url, fresh, 1, shared=True)
    got = sorted(p.relative_to(fresh).as_posix() for p in fresh.rglob("*") if p.is_file())
    assert got == ["global_step3/mp_rank_00_model_states.pt", "global_step3/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                   "rng_state_1.pth", "trainer_state.json"]


def test_the_identity_holds_the_processes_per_node_not_the_hosts(tiny_model_dir):
    from vlm_core.identity import make_identity

    def identity(*lines: str, extra: tuple[str, ...] = ()) -> str:
        cfg = load_config(None, ["train.launcher=deepspeed", f"model.path={tiny_model_dir}", "train.master_addr=10.0.0.1",
                                 f"train.hostfile={json.dumps(list(lines))}", *extra])
        return make_identity(cfg, "data", "model").id

    same = identity("a slots=2", "b slots=2")
    assert identity("fresh1 slots=2", "fresh2 slots=2", extra=("train.ssh_port=2222",)) == same  # resume on new nodes
    assert identity("a slots=2", "b slots=2", "c slots=2", extra=("train.exclude=c",)) == same
    assert identity("a slots=4") != same and identity("a slots=2", "b slots=1") != same
