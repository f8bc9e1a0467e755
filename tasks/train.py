"""Prefect task: launch distributed training as a subprocess group, report progress, upload checkpoints.

Called directly from the flow (not `.submit()`), so a cancellation reaches the thread that reads the
training output and the whole process group is killed (tasks.process). With storage.url set, new
complete checkpoints go up while training runs; a retried or restarted run resumes from the newest
complete checkpoint (local, else fetched from storage) and never starts from zero. A failure that
would repeat (a config or data error, a locked or foreign folder, an exception a rank raised) is not
retried (tasks.errors); a rank's exception is reported as the first failing rank's own error line.
With train.launcher=slurm the ranks run as a Slurm batch job (vlm_core.slurm) that this task submits,
follows (its output streams into the log as a local launcher's would) and cancels on cancel.

What the run is doing is in the log all along: each start-up phase the ranks report (setting up
the ranks, loading the model ...), a progress line every `logging.progress_seconds` while training
(step/total, samples/s, tokens/s, ETA, latest loss), and, whenever nothing else was said for 5 s
(or a little more than `logging.progress_seconds`, if that is longer), what the run is still busy
with and for how long (a launcher starting up, a slow first batch, a long evaluation), so a user
never faces a silent log.

With `train.hostfile` (train.launcher=deepspeed) this node runs DeepSpeed's runner, which starts every
node over SSH and prefixes each node's lines with `host: `; events are read behind that prefix, a
failing rank is named with its node, every node's warnings and errors go to the log behind its name
(the rest of each node's output is in train.log), as do pdsh's own lines (a node that cannot be
reached, a node's exit code), and a cancel ends the processes on every node
(vlm_core.multinode). Without a shared folder (train.shared_output_dir=false) the ranks upload their
own checkpoint files (vlm_core.rank_checkpoints) instead of this task.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from tasks.errors import JobCancelled, JobInterrupted, TrainingFailed, retry_unless_user_error
from tasks.process import ProcessFailed, kill_procs, process_tree, run_group
from tasks.storage import load_storage_credentials
from vlm_core.checkpoints import (
    CheckpointUploader,
    fetch_latest_checkpoint,
    newest_in_storage,
    upload_new_checkpoints,
)
from vlm_core.config import FinetuneConfig, to_json
from vlm_core.identity import claim_run_folder, compute_identity
from vlm_core.launch import check_run, command, free_rendezvous_port, thread_env
from vlm_core.lock import FolderLock
from vlm_core.multinode import (
    check_ssh,
    inline_hostfile,
    is_multinode,
    new_launch_id,
    runner_command,
    split_host,
    stop_everywhere,
    write_launch_files,
)
from vlm_core.progress import ProgressEvent, parse, parse_error
from vlm_core.report import significant
from vlm_core.safe_load import check_checkpoint_files
from vlm_core.slurm import run_job

QUIET_SECONDS = 5.0  # a "still ..." line when the log has been quiet this long (at least)
NOTEWORTHY = re.compile(r"Traceback|Error|WARNING|Warning|Killed|exited with")  # a node's lines the run log shows


def progress_line(f: dict) -> str:
    """A step event as one line: step/total, percent, samples/s, tokens/s, the latest logged loss, ETA."""
    loss = f"{f['loss']:.4g} (logged at step {f['loss_step']})" if f.get("loss") is not None else "not logged yet"
    return (f"step {f['step']}/{f['max_steps']} ({100 * f['step'] / max(f['max_steps'], 1):.0f}%) | "
            f"{f['samples_per_s']:.3g} samples/s | {f['tokens_per_s']:,.0f} tokens/s | loss {loss} | "
            f"ETA {datetime.timedelta(seconds=round(f['eta_s']))}")


class Narrator:
    """The task's voice in the run log: events as they come, and "still <phase>" whenever the log has been
    quiet for `quiet_s` seconds (said from a thread of its own while `running`)."""

    def __init__(self, log: logging.LoggerAdapter, quiet_s: float = QUIET_SECONDS):
        self.log, self.quiet_s = log, quiet_s
        self.phase, self.phase_since = "launching the ranks", time.monotonic()
        self.said = time.monotonic()
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def say(self, msg: str, *args) -> None:
        with self.lock:
            self.log.info(msg, *args)
            self.said = time.monotonic()

    def now_doing(self, phase: str) -> None:
        with self.lock:
            if phase != self.phase:
                self.phase, self.phase_since = phase, time.monotonic()

    def _watch(self) -> None:
        while not self.stopped.wait(0.5):
            with self.lock:
                now = time.monotonic()
                if now - self.said >= self.quiet_s:
                    self.log.info("still %s, %.0f s so far", self.phase, now - self.phase_since)
                    self.said = now

    @contextmanager
    def running(self) -> Iterator[None]:
        """The "still ..." lines are said while inside."""
        thread = threading.Thread(target=self._watch, name="training-narrator", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self.stopped.set()
            thread.join()


def report_event(event: ProgressEvent, say: Narrator, progress_id) -> None:
    """One training progress event into the Prefect log and the progress artifact."""
    f = event.fields
    if event.kind == "phase":
        say.now_doing(f["phase"])
        say.say("%s", f["phase"])
    elif event.kind == "start":
        say.now_doing("waiting for the first optimizer step (first batches, DataLoader workers starting)")
        say.say("training on %d rank(s), effective batch %d, max steps %d%s", f["world_size"], f["effective_batch"],
                f["max_steps"], f", resumed from {f['resumed_from']}" if f["resumed_from"] else "")
    elif event.kind == "step":
        update_progress_artifact(progress_id, 100.0 * f["step"] / max(f["max_steps"], 1))
        say.now_doing(f"working on step {f['step'] + 1}/{f['max_steps']}")
        say.say("%s", progress_line(f))
    elif event.kind == "log":
        if f.get("max_steps"):
            update_progress_artifact(progress_id, 100.0 * f["step"] / f["max_steps"])
            say.now_doing(f"working on step {f['step'] + 1}/{f['max_steps']}")
        shown = [f"{k} {significant(f[k])}" for k in ("loss", "eval_loss", "learning_rate") if k in f]
        if shown:
            say.say("step %d: %s", f["step"], ", ".join(shown))
    elif event.kind == "checkpoint":
        say.say("checkpoint %s", f["path"])


def training_failed(failures: list[tuple[int, str]], log_file: Path, hosts: dict[int, str] | None = None) -> TrainingFailed:
    """The error of a run whose ranks raised: the first failing rank (and its node) and its exception, the
    others by number."""
    rank, what = failures[0]
    others = sorted({r for r, _ in failures} - {rank})
    also = f" (rank{'s' * (len(others) > 1)} {', '.join(map(str, others))} failed too)" if others else ""
    where = f" on {hosts[rank]}" if hosts and rank in hosts else ""
    return TrainingFailed(f"training failed: rank {rank}{where} raised {what}{also}; the full traceback is in {log_file}")


def kill_every_node(cfg: FinetuneConfig, launch_id: str, log: logging.LoggerAdapter, pid: int) -> None:
    """Take a hostfile launch down: the runner by SIGKILL (on SIGTERM it would pkill every DeepSpeed launcher
    on every host, other jobs' too), every node's processes of this launch over ssh, then the local rest (pdsh
    and its ssh clients)."""
    tree = process_tree(pid)
    if tree:
        try:
            tree[0].kill()
        except Exception:  # noqa: BLE001 - gone already
            pass
    unreachable = stop_everywhere(cfg, launch_id)
    if unreachable:
        log.warning("could not reach %s over ssh to stop this run's processes there; check them by hand "
                    "(they carry --vlmft_launch=%s)", ", ".join(unreachable), launch_id)
    kill_procs(tree[1:])


def run_slurm_job(cfg: FinetuneConfig, run_json: Path, on_line: Callable[[str], None], narrator: Narrator) -> None:
    """train.launcher=slurm: submit the batch job, stream its output into train.log and `on_line` until it
    ends, and turn how it ended into the task's outcome: COMPLETED returns; FAILED raises ProcessFailed
    (the caller names a failing rank's exception from it); a preempted, timed-out or node-failed job raises
    JobInterrupted (retried: resumes from the newest complete checkpoint); a job cancelled outside this
    flow raises JobCancelled (not retried). A cancel of the flow cancels the job (vlm_core.slurm.follow)."""
    log_file = Path(cfg.train.output_dir) / "train.log"
    tail: deque[str] = deque(maxlen=40)
    narrator.now_doing("waiting for the Slurm job to start and its ranks to report")
    with open(log_file, "a", buffering=1) as log:
        def tee(line: str) -> None:
            log.write(line + "\n")
            tail.append(line)
            on_line(line)

        job_id, state, output = run_job(cfg, run_json, thread_env(cfg), tee, lambda msg: narrator.say("%s", msg))
    if state.outcome == "completed":
        return
    ended = f"Slurm job {job_id} ended {state.describe()}; its output is in {output} (and {log_file})"
    if state.outcome == "failed":
        raise ProcessFailed(f"{ended}; its last lines:\n" + "\n".join(tail))
    if state.outcome == "interrupted":
        raise JobInterrupted(f"{ended}: a retry resumes from the newest complete checkpoint")
    raise JobCancelled(f"{ended}: cancelled outside this flow, so not retried")


@task(name="train", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
def train_task(cfg: FinetuneConfig) -> dict:
    """Train the run `cfg` describes (train.output_dir already resolved by the flow, see with_run_dir).

    One writer per output folder: the lock (vlm_core.lock) is held from before the checks until
    training and the final checkpoint upload end, and covers the launcher's processes too."""
    with FolderLock(cfg.train.output_dir, "training run") as lock:
        if lock.took_over:
            get_run_logger().warning(lock.took_over)
        return _train(cfg, lock)


def _train(cfg: FinetuneConfig, lock: FolderLock) -> dict:
    log = get_run_logger()
    cfg = inline_hostfile(cfg)  # the other nodes read the hostfile's lines from the run config
    out = Path(cfg.train.output_dir)
    multinode = is_multinode(cfg)
    identity = claim_run_folder(cfg, compute_identity(cfg))  # another run's folder is refused here
    run_id = identity.run_id(cfg.name)
    log.info("run %s (identity %s)%s", run_id, identity.id[:12],
             f", continuing {identity.parent['checkpoint']}" if identity.parent else "")
    if cfg.storage.url:
        load_storage_credentials(cfg)
    done_file = out / "run_summary.json"
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}
    if done.get("identity") == identity.id:
        log.info("%s already holds this finished run: not training again", out)
        if cfg.storage.url and cfg.storage.upload_checkpoints and cfg.train.shared_output_dir:  # a failed upload
            upload_new_checkpoints(out, cfg.storage.url, run_id)  # of that run is retried here
        return done
    check_run(cfg)  # fails in a second, before any process starts
    if multinode:
        check_ssh(cfg)  # every node answers over ssh without a password
    if not cfg.train.shared_output_dir:  # the ranks fetch their own files of it (vlm_core.rank_checkpoints)
        if cfg.train.resume_from == "auto" and (found := newest_in_storage(cfg.storage.url, run_id)):
            log.info("resuming from %s (each node fetches its own files of it)", found)
    elif cfg.storage.url and cfg.train.resume_from == "auto":
        resume = fetch_latest_checkpoint(cfg.storage.url, run_id, out)  # local, else fetched from storage
        if resume:
            check_checkpoint_files(resume)  # storage is untrusted: refuse a crafted pickle before any launch
            log.info("resuming from %s", resume)
    cfg, moved = free_rendezvous_port(cfg)
    if moved:
        log.warning(moved)
    run_json = out / "run.json"
    run_json.write_text(to_json(cfg))
    env = {**os.environ, **thread_env(cfg)}
    kill = None
    if multinode:
        launch_id = new_launch_id()
        hostfile, env_file = write_launch_files(cfg, out, to_json(cfg), thread_env(cfg))
        cmd = runner_command(cfg, run_json, hostfile, launch_id)
        env["DS_ENV_FILE"] = str(env_file)  # read by the runner: the ranks' environment on every node
        kill = functools.partial(kill_every_node, cfg, launch_id, log)
    elif cfg.train.launcher == "slurm":
        cmd = []  # the batch job's script is the command (vlm_core.slurm)
    else:
        cmd = command(cfg, run_json)
    progress_id = create_progress_artifact(0.0, key="training-progress", description="Optimizer steps done")
    # the "still ..." lines never come between two progress lines of a steady run
    narrator = Narrator(log, quiet_s=max(QUIET_SECONDS, cfg.logging.progress_seconds + 2))
    summary: dict = {}
    failures: list[tuple[int, str]] = []  # (rank, "Type: message") of each rank that raised, first first
    failed_on: dict[int, str] = {}  # rank -> node, for a hostfile launch

    def on_line(line: str) -> None:
        host, line = split_host(line) if multinode else (None, line)
        if multinode and line.startswith("pdsh@"):
            narrator.say("%s", line)  # pdsh's own word: a node unreachable, a node's exit code
            return
        if failure := parse_error(line):
            failures.append(failure)
            if host:
                failed_on.setdefault(failure[0], host)
            return
        event = parse(line)
        if event is None:
            if host and NOTEWORTHY.search(line):
                narrator.say("%s: %s", host, line)  # a node's warnings and errors, with the node's name
            return
        if event.kind == "done":
            summary.update(event.fields)
            narrator.now_doing("ending the ranks")
        else:
            report_event(event, narrator, progress_id)

    def on_start(proc) -> None:
        (out / "train.pid").write_text(str(proc.pid))
        lock.add_pid(proc.pid)  # the launcher outlives this process if it is SIGKILLed: the folder stays locked

    uploader = None
    if cfg.storage.url and cfg.storage.upload_checkpoints and cfg.train.shared_output_dir:
        uploader = CheckpointUploader(out, cfg.storage.url, run_id).start()
    with narrator.running():
        try:
            if cfg.train.launcher == "slurm":
                run_slurm_job(cfg, run_json, on_line, narrator)
            else:
                narrator.say("launching: %s", " ".join(cmd))
                run_group(cmd, env, out / "train.log", on_line=on_line, on_start=on_start, **({"kill": kill} if kill else {}))
        except ProcessFailed as exc:
            if multinode:  # the runner ended, a node's ranks may not have
                stop_everywhere(cfg, launch_id)
            if not failures or isinstance(exc, (JobInterrupted, JobCancelled)):
                raise  # no rank raised (killed, out of memory): the message ends with the log's last lines
            raise training_failed(failures, out / "train.log", failed_on) from exc
        finally:
            if multinode:
                env_file.unlink(missing_ok=True)  # it may hold storage credentials
            if uploader:
                narrator.now_doing("uploading the last checkpoints to storage")
                sent = uploader.stop()  # final pass: the last checkpoint goes up too
                log.info("uploaded %d checkpoint(s) to storage", len(sent))
                if uploader.failed_passes:
                    log.warning("%d checkpoint upload pass(es) failed while training and were retried; last error: %s",
                                uploader.failed_passes, uploader.last_error)
    if not cfg.train.shared_output_dir:  # the ranks uploaded their own files (vlm_core.rank_checkpoints)
        log.info("newest checkpoint complete in storage (every rank's files): %s", newest_in_storage(cfg.storage.url, run_id))
    return summary
