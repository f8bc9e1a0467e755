"""Training as a Slurm batch job (train.launcher=slurm): the batch script, submitting it, following it, cancelling it.

On a cluster the Prefect worker sits on a login node, which must not train: the compute nodes are
Slurm's to hand out. So the training task writes a batch script into the run folder, submits it with
`sbatch --parsable` and follows the job from the login node: its state (`scontrol show job`, or
`sacct` once the controller has forgotten the job) and its output file, which lies in the run folder
(a filesystem the login and compute nodes share) and whose lines go through the same progress parser
as a local launcher's output. Whatever ends the follower early (a Prefect cancel, Ctrl-C, a crash)
cancels the job with `scancel` and waits until Slurm has ended it.

One Slurm task per rank (`srun` with train.nproc_per_node tasks per node; RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set from SLURM_PROCID, SLURM_LOCALID, the node list and the
config), not one torchrun per node: each rank is then a process Slurm started and tracks itself, so
scancel, a time limit or a preemption reaches every rank whatever process tracking the cluster uses
(torchrun starts each rank in a session of its own, which proctrack/pgid loses track of); the CPUs
and GPUs Slurm gives a task are its rank's; and `--kill-on-bad-exit` ends the whole step when one
rank dies, instead of leaving the others waiting in a collective. The rendezvous is torch's env://
on the first host of the allocation (`scontrol show hostnames`), at train.master_port.

How a job ended decides what the task does (`outcome`): COMPLETED is success; FAILED is a rank's
exception (not retried) or a rank that died without one (retried); PREEMPTED, TIMEOUT, NODE_FAIL,
BOOT_FAIL, OUT_OF_MEMORY and DEADLINE interrupt a run that a retry resumes from its newest complete
checkpoint; CANCELLED from outside the flow is somebody's decision and is not retried.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vlm_core.config import ConfigError, FinetuneConfig

COMMANDS = ("sbatch", "scontrol", "scancel")  # what the login node needs; sacct is used when present
SCRIPT = "slurm_job.sh"
JOB_ID_FILE = "slurm_job_id"  # the job this run folder last submitted (a restarted task cancels it if it still runs)
POLL_SECONDS = 2.0
Outcome = Literal["running", "completed", "failed", "interrupted", "cancelled"]

# How each final job state is handled; any other state (PENDING, RUNNING, COMPLETING, REQUEUED,
# SUSPENDED ...) means the job is not over yet (a requeued job runs again under the same id).
FINAL_STATES: dict[str, Outcome] = {
    "COMPLETED": "completed",
    "FAILED": "failed",
    "SPECIAL_EXIT": "failed",
    "PREEMPTED": "interrupted",
    "TIMEOUT": "interrupted",
    "NODE_FAIL": "interrupted",
    "BOOT_FAIL": "interrupted",
    "OUT_OF_MEMORY": "interrupted",
    "DEADLINE": "interrupted",
    "CANCELLED": "cancelled",
    "REVOKED": "cancelled",
}


class SlurmError(RuntimeError):
    """A Slurm command failed, or the job cannot be found any more."""


@dataclass(frozen=True)
class JobState:
    """A job's state as Slurm reports it: `state` (RUNNING, TIMEOUT ...), `exit_code` ("exit:signal"),
    `reason` (why it waits or ended) and `nodes` (its node list, once it runs)."""

    state: str
    exit_code: str = ""
    reason: str = ""
    nodes: str = ""

    @property
    def outcome(self) -> Outcome:
        return outcome(self.state)

    def describe(self) -> str:
        extra = [f"reason {self.reason}" if self.reason not in ("", "None") else "",
                 f"on {self.nodes}" if self.nodes not in ("", "(null)", "None Assigned") else "",
                 f"exit code {self.exit_code}" if self.outcome != "running" and self.exit_code else ""]
        return self.state + "".join(f", {e}" for e in extra if e)


def outcome(state: str) -> Outcome:
    """What a Slurm job state means for the run ("CANCELLED by 0", as sacct writes it, is CANCELLED)."""
    return FINAL_STATES.get(state.split()[0].rstrip("+") if state.strip() else "", "running")


def asks_for_gpus(cfg: FinetuneConfig) -> bool:
    """Whether the job gets GPUs: train.slurm.gpus_per_node, or a GPU option among train.slurm.extra_sbatch."""
    s = cfg.train.slurm
    return s.gpus_per_node is not None or any(
        line.startswith(("--gres=gpu", "--gpus", "-G")) for line in s.extra_sbatch)


def check_slurm(cfg: FinetuneConfig) -> None:
    """The Slurm commands the login node needs are on PATH, and the settings the job cannot honour are not set."""
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        raise ConfigError(
            f"train.launcher=slurm needs Slurm's client commands on the PATH of the machine that runs the flow "
            f"(a cluster login node); not found: {', '.join(missing)}. Run the Prefect worker on a login node, "
            "or use train.launcher=torchrun"
        )
    for key, folder in (("train.output_dir", Path(cfg.train.output_dir).resolve()), ("the working directory", Path.cwd())):
        if any(c.isspace() for c in str(folder)):
            raise ConfigError(f"{key} ({folder}) has a space in its path, which #SBATCH lines cannot carry; "
                              "use a folder without spaces")
    if cfg.train.node_rank != 0:
        raise ConfigError("train.node_rank is set by Slurm for each node of the job; leave it at 0 with "
                          "train.launcher=slurm")


def batch_script(cfg: FinetuneConfig, config_path: Path, env: dict[str, str], python: str = sys.executable,
                 workdir: Path | None = None) -> str:
    """The sbatch script: the resources as #SBATCH lines, then one srun task per rank running vlm_core.train.

    `env` (vlm_core.launch.thread_env) is exported, except OMP_NUM_THREADS, which follows the CPUs
    Slurm gives each task, and DS_ACCELERATOR, which is cpu exactly when the job asks for no GPUs.
    """
    t, s = cfg.train, cfg.train.slurm
    out = Path(t.output_dir).resolve()
    options = [f"--job-name=vlmft-{cfg.name}", f"--nodes={t.nnodes}", f"--ntasks-per-node={t.nproc_per_node}"]
    options += [f"--cpus-per-task={s.cpus_per_task}"] * (s.cpus_per_task is not None)
    options += [f"--gpus-per-node={s.gpus_per_node}"] * (s.gpus_per_node is not None)
    options += [f"--partition={s.partition}"] * (s.partition is not None)
    options += [f"--time={s.time}"] * (s.time is not None)
    options += [f"--account={s.account}"] * (s.account is not None)
    options += [f"--output={out}/slurm-%j.out", "--open-mode=append", f"--chdir={(workdir or Path.cwd()).resolve()}"]
    options += s.extra_sbatch
    exports = {k: v for k, v in env.items() if k not in ("OMP_NUM_THREADS", "DS_ACCELERATOR")}
    if not asks_for_gpus(cfg):
        exports["DS_ACCELERATOR"] = "cpu"
    exports |= {"WORLD_SIZE": str(t.nnodes * t.nproc_per_node), "LOCAL_WORLD_SIZE": str(t.nproc_per_node),
                "MASTER_PORT": str(t.master_port)}
    srun = ["srun", "--kill-on-bad-exit=1", f"--ntasks-per-node={t.nproc_per_node}"]
    srun += [f"--cpus-per-task={s.cpus_per_task}"] * (s.cpus_per_task is not None)  # srun does not inherit it
    rank = ('export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID GROUP_RANK=$SLURM_NODEID; exec '
            + shlex.join([python, "-m", "vlm_core.train", "--config", str(Path(config_path).resolve())]))
    return "\n".join([
        "#!/bin/bash",
        f"# written by vlmft for run {cfg.name}: train.nnodes={t.nnodes} x train.nproc_per_node={t.nproc_per_node} "
        "ranks, one Slurm task each",
        *(f"#SBATCH {o}" for o in options),
        "set -euo pipefail",
        *(f"export {k}={shlex.quote(v)}" for k, v in sorted(exports.items())),
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        'echo "vlmft: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, rendezvous at $MASTER_ADDR:$MASTER_PORT"',
        f"{shlex.join(srun)} bash -c {shlex.quote(rank)}",
        "",
    ])


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


UNREACHABLE = ("Unable to contact slurm controller", "Socket timed out", "Connection refused", "connect failure")


def submit(script: Path) -> str:
    """`sbatch --parsable script` → the job id. A job Slurm refuses (no such partition or account, a time
    limit over the partition's ...) is a ConfigError; a controller out of reach is a SlurmError (retried)."""
    res = _run(["sbatch", "--parsable", str(script)])
    if res.returncode != 0:
        why = " ".join((res.stderr or res.stdout).split())
        if "submission failed" in why and not any(u in why for u in UNREACHABLE):
            raise ConfigError(f"Slurm refused the training job ({why}); check train.slurm.partition, account, time, "
                              f"gpus_per_node, cpus_per_task and extra_sbatch (the script is {script})")
        raise SlurmError(f"sbatch {script} failed: {why}")
    return res.stdout.strip().split(";")[0]  # "id" or "id;cluster"


def parse_scontrol(text: str) -> JobState:
    """The fields of `scontrol show job -o ID` (one line of Key=Value pairs) that say where the job is."""
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    return JobState(fields.get("JobState", ""), fields.get("ExitCode", ""), fields.get("Reason", ""),
                    fields.get("NodeList", ""))


def job_state(job_id: str) -> JobState | None:
    """The job's state from the controller, else from accounting; None when neither knows the job."""
    res = _run(["scontrol", "show", "job", "-o", job_id])
    if res.returncode == 0 and "JobState=" in res.stdout:
        return parse_scontrol(res.stdout)
    if "Invalid job id" not in res.stderr + res.stdout:
        raise SlurmError(f"scontrol show job {job_id} failed: {(res.stderr or res.stdout).strip()}")
    if shutil.which("sacct"):  # the controller forgets ended jobs after MinJobAge (300 s by default)
        acct = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode,NodeList"])
        rows = [r.split("|") for r in acct.stdout.splitlines() if r.count("|") == 2]
        if acct.returncode == 0 and rows:
            return JobState(rows[-1][0], rows[-1][1], "", rows[-1][2])
    return None


def cancel(job_id: str, wait_s: float = 120.0) -> JobState | None:
    """scancel the job and wait (at most `wait_s`) until Slurm reports it ended: its processes are gone then."""
    _run(["scancel", job_id])
    deadline = time.monotonic() + wait_s
    while True:
        try:
            state = job_state(job_id)
        except SlurmError:
            state = None
        if state is None or state.outcome != "running" or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def cancel_leftover(out: Path) -> str | None:
    """Cancel the job an earlier attempt on this run folder submitted, if it still runs (its follower died
    without cancelling it: a killed worker). Returns that job's id, or None."""
    old = (out / JOB_ID_FILE).read_text().strip() if (out / JOB_ID_FILE).is_file() else ""
    if not old:
        return None
    try:
        state = job_state(old)
    except SlurmError:
        return None
    if state is None or state.outcome != "running":
        return None
    cancel(old)
    return old


class OutputFollower:
    """Yields the complete lines appended to a file that may not exist yet (the job's output)."""

    def __init__(self, path: Path):
        self.path, self.file, self.partial = path, None, b""

    def lines(self) -> list[str]:
        if self.file is None:
            if not self.path.is_file():
                return []
            self.file = open(self.path, "rb")  # noqa: SIM115 (kept open while the job runs)
        data = self.partial + self.file.read()
        *done, self.partial = data.split(b"\n")
        return [line.decode("utf-8", "replace").rstrip("\r") for line in done]

    def rest(self) -> list[str]:
        """The remaining lines, the last one without its newline too."""
        lines = self.lines()
        if self.partial:
            lines.append(self.partial.decode("utf-8", "replace"))
            self.partial = b""
        return lines

    def close(self) -> None:
        if self.file:
            self.file.close()


def follow(job_id: str, output: Path, on_line: Callable[[str], None], say: Callable[[str], None],
           poll_s: float = POLL_SECONDS, lost_after_s: float = 600.0) -> JobState:
    """Stream the job's output lines to `on_line` until the job has ended; return its final state.

    State changes (pending and why, running and where) go to `say`. A controller out of reach is
    retried for `lost_after_s` before giving up. Any exception raised meanwhile (a cancellation arrives
    as one) cancels the job, waits until Slurm has ended it, and propagates.
    """
    reader = OutputFollower(output)
    last: JobState | None = None
    unreachable_since: float | None = None
    next_poll = 0.0
    try:
        while True:
            for line in reader.lines():
                on_line(line)
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + poll_s
                try:
                    state = job_state(job_id)
                    unreachable_since = None
                except SlurmError as exc:
                    unreachable_since = unreachable_since or time.monotonic()
                    if time.monotonic() - unreachable_since > lost_after_s:
                        raise SlurmError(f"lost track of Slurm job {job_id} for {lost_after_s:.0f} s: {exc}") from exc
                    say(f"could not read the state of Slurm job {job_id}, trying again: {exc}")
                    state = last
                if state is None:
                    raise SlurmError(f"Slurm job {job_id} is unknown to scontrol and sacct; its output is in {output}")
                if last is None or (state.state, state.reason) != (last.state, last.reason):
                    say(f"Slurm job {job_id}: {state.describe()}")
                last = state
                if state.outcome != "running":
                    time.sleep(min(1.0, poll_s))  # the last lines the job wrote, from a shared filesystem
                    for line in reader.rest():
                        on_line(line)
                    return state
            time.sleep(0.2)
    except BaseException:
        if last is None or last.outcome == "running":
            cancel(job_id)
        raise
    finally:
        reader.close()


def run_job(cfg: FinetuneConfig, config_path: Path, env: dict[str, str], on_line: Callable[[str], None],
            say: Callable[[str], None], poll_s: float = POLL_SECONDS) -> tuple[str, JobState, Path]:
    """Write the batch script into the run folder, submit it, follow the job to its end.

    Returns (job id, final state, output file). A job an earlier attempt left running is cancelled first.
    """
    out = Path(cfg.train.output_dir).resolve()
    if old := cancel_leftover(out):
        say(f"cancelled Slurm job {old}, left running by an earlier attempt on {out}")
    script = out / SCRIPT
    script.write_text(batch_script(cfg, config_path, env))
    job_id = submit(script)
    (out / JOB_ID_FILE).write_text(job_id)
    output = out / f"slurm-{job_id}.out"
    say(f"submitted Slurm job {job_id} ({script}); its output: {output}")
    return job_id, follow(job_id, output, on_line, say, poll_s), output
