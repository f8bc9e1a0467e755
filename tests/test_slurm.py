"""train.launcher=slurm: the batch script, job states and their outcome, config errors; and, on a real
single-host Slurm cluster (munged + slurmctld + slurmd started here), a 2-rank job that trains the tiny
model with its progress in the flow's log, a node failure that the task's retry resumes from the newest
checkpoint, and a Prefect cancel that scancels the job and leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import data as D
from helpers.servers import free_port
from helpers.slurm_cluster import SlurmCluster, missing
from tasks.errors import JobCancelled, JobInterrupted, TrainingFailed, worth_retrying
from tasks.process import ProcessFailed
from vlm_core.config import ConfigError, FinetuneConfig, load_config, to_json
from vlm_core.launch import check_launch, thread_env
from vlm_core.slurm import (
    FINAL_STATES,
    JobState,
    OutputFollower,
    batch_script,
    job_state,
    outcome,
    parse_scontrol,
)

# --------------------------------------------------------------------------------------------------
# Fast: the script, the states, the errors


def _slurm_cfg(*extra: str) -> FinetuneConfig:
    return load_config(None, ["name=s", "train.launcher=slurm", "train.output_dir=/shared/runs/s", *extra])


def _sbatch_lines(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_batch_script_asks_for_the_configured_resources_and_starts_one_task_per_rank():
    cfg = _slurm_cfg("train.nnodes=3", "train.nproc_per_node=4", "train.master_port=29411",
                     "train.slurm.partition=gpu", "train.slurm.time='1-12:00:00'", "train.slurm.account=vision",
                     "train.slurm.gpus_per_node=4", "train.slurm.cpus_per_task=8",
                     "train.slurm.extra_sbatch=['--qos=high', '#SBATCH --constraint=a100']")
    script = batch_script(cfg, Path("/shared/runs/s/run.json"), thread_env(cfg), python="/opt/venv/bin/python",
                          workdir=Path("/shared/repo"))
    assert script.startswith("#!/bin/bash\n")
    assert _sbatch_lines(script) == [
        "--job-name=vlmft-s", "--nodes=3", "--ntasks-per-node=4", "--cpus-per-task=8", "--gpus-per-node=4",
        "--partition=gpu", "--time=1-12:00:00", "--account=vision", "--output=/shared/runs/s/slurm-%j.out",
        "--open-mode=append", "--chdir=/shared/repo", "--qos=high", "--constraint=a100"]
    assert "export WORLD_SIZE=12\n" in script and "export LOCAL_WORLD_SIZE=4\n" in script
    assert "export MASTER_PORT=29411\n" in script and "export HF_HUB_OFFLINE=1\n" in script
    assert "DS_ACCELERATOR" not in script  # GPUs asked for: DeepSpeed finds them itself
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in script
    srun = script.strip().splitlines()[-1]
    assert srun.startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=4 --cpus-per-task=8 bash -c ")
    assert "RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID" in srun
    assert srun.endswith("exec /opt/venv/bin/python -m vlm_core.train --config /shared/runs/s/run.json'")
    # a bash syntax check of the whole script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_batch_script_defaults_leave_resources_to_the_cluster_and_run_on_cpu():
    cfg = _slurm_cfg("train.nproc_per_node=2")
    lines = _sbatch_lines(batch_script(cfg, Path("run.json"), thread_env(cfg), workdir=Path("/w")))
    assert lines == ["--job-name=vlmft-s", "--nodes=1", "--ntasks-per-node=2", "--output=/shared/runs/s/slurm-%j.out",
                     "--open-mode=append", "--chdir=/w"]
    assert "export DS_ACCELERATOR=cpu\n" in batch_script(cfg, Path("run.json"), thread_env(cfg))
    gres = _slurm_cfg("train.slurm.extra_sbatch=['--gres=gpu:4']")  # GPUs the older way: no CPU accelerator
    assert "DS_ACCELERATOR" not in batch_script(gres, Path("run.json"), thread_env(gres))


@pytest.mark.parametrize(("state", "expected"), [
    ("COMPLETED", "completed"), ("FAILED", "failed"), ("PREEMPTED", "interrupted"), ("TIMEOUT", "interrupted"),
    ("NODE_FAIL", "interrupted"), ("OUT_OF_MEMORY", "interrupted"), ("BOOT_FAIL", "interrupted"),
    ("CANCELLED", "cancelled"), ("CANCELLED by 0", "cancelled"), ("PENDING", "running"), ("RUNNING", "running"),
    ("COMPLETING", "running"), ("REQUEUED", "running"), ("SUSPENDED", "running"), ("", "running"),
])
def test_job_state_outcome(state, expected):
    assert outcome(state) == expected


def test_scontrol_line_parsed():
    line = ("JobId=7 JobName=vlmft-s UserId=root(0) JobState=TIMEOUT Reason=TimeLimit Dependency=(null) "
            "Requeue=1 ExitCode=0:15 RunTime=00:01:02 NodeList=gpu[01-02] BatchHost=gpu01")
    state = parse_scontrol(line)
    assert state == JobState("TIMEOUT", "0:15", "TimeLimit", "gpu[01-02]")
    assert state.outcome == "interrupted"
    assert state.describe() == "TIMEOUT, reason TimeLimit, on gpu[01-02], exit code 0:15"


def test_which_endings_are_retried():
    """Interrupted jobs resume on retry; a rank's exception and a cancel from outside are final."""
    assert worth_retrying(JobInterrupted("TIMEOUT")) and worth_retrying(ProcessFailed("FAILED, no rank raised"))
    assert not worth_retrying(JobCancelled("CANCELLED")) and not worth_retrying(TrainingFailed("rank 1 raised"))
    assert set(FINAL_STATES.values()) == {"completed", "failed", "interrupted", "cancelled"}


def test_output_follower_yields_whole_lines_only(tmp_path):
    f = tmp_path / "out.txt"
    reader = OutputFollower(f)
    assert reader.lines() == []  # the job has not started writing yet
    f.write_bytes(b"one\ntw")
    assert reader.lines() == ["one"]
    with open(f, "ab") as w:
        w.write(b"o\nthree")
    assert reader.lines() == ["two"]
    assert reader.rest() == ["three"]
    reader.close()


@pytest.mark.parametrize(("override", "message"), [
    ("train.slurm.time=1h", r"train.slurm.time: is not a Slurm time limit; write minutes \(90\)"),
    ("train.slurm.partition='gpu a100'", "train.slurm.partition: must be one word"),
    ("train.slurm.extra_sbatch=['--nodes=4']", r"'--nodes=4': --nodes is set from train.nnodes; set that instead"),
    ("train.slurm.extra_sbatch=['--output=x.log']", "--output is set from the run folder"),
    ("train.slurm.extra_sbatch=['qos=high']", "'qos=high' is not one sbatch option; write e.g. '--qos=high'"),
    ("train.slurm.gpus_per_node=0", "train.slurm.gpus_per_node: must be greater than or equal to 1"),
    ("train.slurm.partiton=gpu", "did you mean 'train.slurm.partition'"),
])
def test_bad_slurm_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        _slurm_cfg(override)


def test_time_limits_slurm_accepts():
    for value in ("90", "30:00", "01:30:00", "2-00", "2-12:00", "2-12:00:00", "UNLIMITED"):
        assert _slurm_cfg(f"train.slurm.time='{value}'").train.slurm.time == value
    with pytest.raises(ConfigError, match=r"train.slurm.time: got the number 5400; write the time limit as a string"):
        _slurm_cfg("train.slurm.time=1:30:00")  # YAML 1.1 reads this as sexagesimal 5400


def _fake_path(tmp_path: Path, commands: tuple[str, ...]) -> str:
    """A PATH holding empty stand-ins for the named commands (check_launch only looks them up)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in commands:
        (bin_dir / name).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    return str(bin_dir)


def test_check_launch_without_sbatch_says_where_the_worker_must_run(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _fake_path(tmp_path, ("scontrol",)))
    with pytest.raises(ConfigError, match=r"train.launcher=slurm needs Slurm's client commands on the PATH .*"
                                          r"not found: sbatch, scancel\. Run the Prefect worker on a login node"):
        check_launch(_slurm_cfg(f"model.path={tiny_model_dir}"))


def test_check_launch_judges_gpus_by_the_job_not_the_login_node(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _fake_path(tmp_path, ("sbatch", "scontrol", "scancel")))
    base = (f"model.path={tiny_model_dir}", "train.bf16=true", "train.deepspeed=zero2")
    with pytest.raises(ConfigError, match=r"needs a GPU; in a CPU-only Slurm job \(no train.slurm.gpus_per_node\)"):
        check_launch(_slurm_cfg(*base))
    check_launch(_slurm_cfg(*base, "train.slurm.gpus_per_node=8"))  # this CPU-only machine only submits
    check_launch(_slurm_cfg(*base, "train.slurm.extra_sbatch=['--gres=gpu:4']"))
    with pytest.raises(ConfigError, match="train.output_dir .* has a space in its path"):
        check_launch(_slurm_cfg(*base, "train.slurm.gpus_per_node=8", f"train.output_dir='{tmp_path}/my runs'"))
    with pytest.raises(ConfigError, match="train.node_rank is set by Slurm"):
        check_launch(_slurm_cfg(*base, "train.slurm.gpus_per_node=8", "train.nnodes=2", "train.node_rank=1"))


# --------------------------------------------------------------------------------------------------
# A real cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing()
    if why:  # `make test` installs these (make system-deps); a missing cluster is a failure, not a skip
        pytest.fail(f"cannot start the test Slurm cluster: {why}")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(c.conf)  # the flows of this module submit to it
    yield c
    if before is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = before
    c.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_model_dir) -> Path:
    return D.training_shards(tmp_path_factory.mktemp("slurm-data"), tiny_model_dir, 20, 6, 4)


def _train_cfg(tiny_model_dir, shards, out: Path, *extra: str) -> FinetuneConfig:
    return load_config(None, [
        "name=t", f"model.path={tiny_model_dir}", "model.dtype=float32", f"data.shards={shards}",
        "data.max_dynamic_patch=2", "data.num_workers=1", "data.shuffle_buffer=8", f"train.output_dir={out}",
        "train.per_device_batch_size=2", "train.learning_rate=3e-3", "train.warmup_ratio=0", "train.bf16=false",
        "train.lr_scheduler=constant", "train.logging_steps=1", "train.save_steps=3", "train.eval_steps=100",
        "train.max_steps=6", "train.nproc_per_node=2", "train.deepspeed=zero2", f"train.master_port={free_port()}",
        "train.launcher=slurm", "logging.report_to=[]", "logging.progress_seconds=1", *extra])


def _ranks_of(out: Path) -> list[psutil.Process]:
    """Live processes of the run in `out` (ranks and their DataLoader workers; zombies left to an init that does
    not reap are not processes any more)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and str(out) in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def _job_ids(out: Path) -> list[str]:
    return sorted(p.name.removeprefix("slurm-").removesuffix(".out") for p in out.glob("slurm-*.out"))


@pytest.mark.integration
def test_a_job_slurm_refuses_is_a_config_error_naming_the_slurm_keys(cluster, tmp_path):
    from vlm_core.slurm import run_job

    cfg = _slurm_cfg(f"train.output_dir={tmp_path}", "train.slurm.partition=nosuchpartition")
    with pytest.raises(ConfigError, match=r"Slurm refused the training job \(.*invalid partition.*\); check "
                                          r"train.slurm.partition, account, time"):
        run_job(cfg, tmp_path / "run.json", thread_env(cfg), print, print)
    assert (tmp_path / "slurm_job.sh").is_file() and not list(tmp_path.glob("slurm-*.out"))


@pytest.mark.integration
def test_a_job_left_running_by_a_killed_worker_is_cancelled_before_a_new_one(cluster, tmp_path):
    from vlm_core.slurm import JOB_ID_FILE, cancel_leftover, submit

    script = tmp_path / "sleep.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --output={tmp_path}/slurm-%j.out\nsrun sleep 300\n")
    old = submit(script)
    (tmp_path / JOB_ID_FILE).write_text(old)
    deadline = time.time() + 30
    while job_state(old).state != "RUNNING" and time.time() < deadline:
        time.sleep(0.2)
    assert cancel_leftover(tmp_path) == old and job_state(old).state == "CANCELLED"
    assert cancel_leftover(tmp_path) is None  # an ended job is left alone


@pytest.mark.integration
def test_slurm_job_trains_two_ranks_with_progress_in_the_flow_log(cluster, prefect_server, tiny_model_dir, shards,
                                                                  tmp_path):
    from flows.train import train
    from helpers.flow_runs import flow_run_logs

    out = tmp_path / "run"
    state = train(_train_cfg(tiny_model_dir, shards, out), return_state=True)
    summary = state.result()
    assert summary["world_size"] == 2 and summary["global_step"] == 6
    assert (out / "checkpoint-6" / "checkpoint_complete.json").is_file()
    [job] = _job_ids(out)
    assert job_state(job).state == "COMPLETED"
    logs = flow_run_logs(state.state_details.flow_run_id)
    assert any(m.startswith(f"submitted Slurm job {job}") for m in logs)
    assert any(m.startswith(f"Slurm job {job}: RUNNING") for m in logs)
    assert any(m.startswith("training on 2 rank(s)") for m in logs)  # the ranks' events, parsed from the job output
    assert any(m.startswith("step 6/6 (100%)") for m in logs)
    assert "VLMFT_PROGRESS" in (out / f"slurm-{job}.out").read_text() and "VLMFT_PROGRESS" in (out / "train.log").read_text()
    assert _ranks_of(out) == []


@pytest.mark.integration
def test_node_failure_is_retried_and_resumes_from_the_newest_checkpoint(cluster, prefect_server, tiny_model_dir,
                                                                        shards, tmp_path):
    """The node goes down after the first checkpoint: the job ends NODE_FAIL, the task's retry submits a new
    job, which resumes from checkpoint-2 instead of starting over."""
    import threading

    from flows.train import train

    out = tmp_path / "run"
    cfg = _train_cfg(tiny_model_dir, shards, out, "train.max_steps=4", "train.save_steps=2",
                     "train.slurm.extra_sbatch=['--no-requeue']")  # else Slurm itself requeues the job

    def fail_node_after_first_checkpoint():
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoint-2" / "checkpoint_complete.json").is_file():
            time.sleep(0.2)
        # the job is killed as NODE_FAIL; the node answers the next ping and is back (ReturnToService=2)
        subprocess.run(["scontrol", "update", f"NodeName={cluster.host}", "State=DOWN", "Reason=test"],
                       env=cluster.env, check=True, capture_output=True)

    failer = threading.Thread(target=fail_node_after_first_checkpoint)
    failer.start()
    summary = train(cfg)
    failer.join()
    first, second = _job_ids(out)
    assert job_state(first).state == "NODE_FAIL" and job_state(second).state == "COMPLETED"
    assert summary["global_step"] == 4 and summary["resumed_from"].endswith("checkpoint-2")
    assert _ranks_of(out) == []


FLOW_SCRIPT = """
import sys
from flows.train import train
from vlm_core.config import from_json
train(from_json(open(sys.argv[1]).read()))
"""


@pytest.mark.integration
def test_prefect_cancel_scancels_the_job_and_leaves_no_process(cluster, prefect_server, tiny_model_dir, shards,
                                                               tmp_path):
    """What a Prefect worker does on cancel: SIGTERM the flow process. The job is cancelled, every rank ends."""
    from prefect.settings import PREFECT_API_URL

    out = tmp_path / "run"
    cfg = _train_cfg(tiny_model_dir, shards, out, "train.max_steps=500", "train.save_steps=1000")
    out.mkdir()
    (out / "cfg.json").write_text(to_json(cfg))
    env = {**cluster.env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": PREFECT_API_URL.value()}
    flow = subprocess.Popen([sys.executable, "-c", FLOW_SCRIPT, str(out / "cfg.json")], env=env,
                            stdout=open(tmp_path / "flow.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        assert flow.poll() is None, (tmp_path / "flow.log").read_text()[-3000:]
        time.sleep(0.2)
    [job] = _job_ids(out)
    ranks = [p for p in _ranks_of(out) if "vlm_core.train" in " ".join(p.cmdline())]
    assert len(ranks) >= 2, [p.cmdline() for p in _ranks_of(out)]  # both ranks train (+ DataLoader workers)
    assert job_state(job).state == "RUNNING"
    flow.send_signal(signal.SIGTERM)
    flow.wait(timeout=60)
    assert job_state(job).state == "CANCELLED"  # the flow waited until Slurm had ended it
    _, alive = psutil.wait_procs(ranks, timeout=5)
    assert alive == [] and _ranks_of(out) == [], [p.cmdline() for p in _ranks_of(out)]
    assert json.loads((out / "run.json").read_text())["train"]["launcher"] == "slurm"
