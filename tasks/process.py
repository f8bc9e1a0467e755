"""Run a command as its own process group, stream its output, and never leave it behind.

The training launcher (torchrun / deepspeed) starts one process per rank, and torchrun starts each
rank in a session of its own (torch.distributed.elastic), so neither killing the launcher nor killing
its process group reaches the ranks: a SIGKILLed torchrun leaves them training as orphans. So the
command starts in a new session, its output is read line by line in the calling thread (a Prefect
cancellation arrives there as an exception), and on any exit path other than a clean finish the whole
process *tree* (launcher, ranks, their DataLoader workers) gets SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import subprocess
from collections import deque
from collections.abc import Callable
from pathlib import Path

import psutil


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (whatever session or group they moved to)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process and its descendants, wait `grace` seconds, SIGKILL whatever is left."""
    kill_procs(process_tree(pid), grace)


def kill_procs(procs: list[psutil.Process], grace: float = 10.0) -> None:
    """SIGTERM these processes, wait `grace` seconds, SIGKILL whatever is left (and children born meanwhile)."""
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    alive += [c for p in alive if p.is_running() for c in process_tree(p.pid)[1:]]  # children born meanwhile
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


class ProcessFailed(RuntimeError):
    """The command exited non-zero; the message ends with the last lines of its output."""


def run_group(
    cmd: list[str],
    env: dict[str, str],
    log_file: Path,
    on_line: Callable[[str], None] | None = None,
    on_start: Callable[[subprocess.Popen], None] | None = None,
    tail_lines: int = 40,
    kill: Callable[[int], None] = kill_tree,
) -> None:
    """Run `cmd` to completion; every line goes to `log_file` and `on_line`; raise on failure.
    `kill(pid)` takes the command's processes down on any other exit (default: its whole local tree)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=tail_lines)
    with open(log_file, "a", buffering=1) as log:
        log.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=env, start_new_session=True)
        try:
            if on_start:
                on_start(proc)
            for line in proc.stdout:
                log.write(line)
                tail.append(line.rstrip("\n"))
                if on_line:
                    on_line(line.rstrip("\n"))
            rc = proc.wait()
        except BaseException:  # cancellation, crash, Ctrl-C: take the whole tree down
            kill(proc.pid)
            proc.wait()
            raise
        finally:
            if proc.poll() is None:
                kill(proc.pid)
                proc.wait()
    if rc != 0:
        raise ProcessFailed(f"{cmd[0]} ... exited with code {rc}; last lines of {log_file}:\n" + "\n".join(tail))
