"""One writer per folder: an exclusive lock on a run folder, a shard folder or an upload prefix.

Why: nothing stopped two `vlmft train` runs on one train.output_dir (they only needed different
master ports). Both ran to the end and exited 0, one metrics.jsonl held every step twice, and the
checkpoints were whichever run wrote last. The same holds for two shard preparations on one
data.shards and two uploads to one storage prefix. Whatever a run publishes can only be trusted if
exactly one process wrote it, so each of those writers holds a `FolderLock` while it writes, and a
second one fails at once with a message that names the holder and what to do.

How:

- A local folder is locked by `<folder>/.vlmft.lock`, created atomically (O_CREAT|O_EXCL, so of two
  processes exactly one creates it) and holding JSON: what is locked, the holder's PID, host,
  process create time, start time and command line. On a shared filesystem this excludes writers on
  other machines too.
- A URL (s3://..., any fsspec URL but file://) cannot be locked in the object store itself: object
  stores have no atomic create-if-absent that works everywhere. It is locked by a local file keyed
  by the URL's hash in the lock directory ($VLMFT_LOCK_DIR, default `vlmft-locks` in the system
  temp dir). That only excludes writers on the same machine.
- A lock whose holder is on this host and no longer runs (its PID is gone, or now belongs to a
  process with another create time: a reused PID) is stale: it is taken over with one warning that
  names the dead holder (`FolderLock.took_over` carries the same line for the caller's own log). A
  lock held from another host is never taken over: this host cannot see that host's processes.
- Checking and taking over happen under an `fcntl.flock` on a guard file in the lock directory, so
  two processes of one host never both take over the same stale lock (take-over only ever concerns
  holders on this host, so a guard of this host is all it needs).
- The holder can register more PIDs (`add_pid`): the lock stays alive while any of them runs. The
  training launcher and its ranks sit in sessions of their own, so if the process that took the lock
  is SIGKILLed while they still train, the folder is still being written and stays locked.
- The lock is released on leaving the `with` block (normally or by an exception), and only if the
  lock file is still ours.

The host is compared by hostname: containers that share a folder must have different hostnames
(the default), or their PIDs would be compared across PID namespaces.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil

LOCK_NAME = ".vlmft.lock"
LOCK_DIR_ENV = "VLMFT_LOCK_DIR"
_CREATE_TIME_TOLERANCE = 1.0  # seconds: one process read twice always agrees far closer than this

log = logging.getLogger(__name__)


class LockHeld(RuntimeError):
    """Another live process writes to this folder or URL; the message names it and what to do."""


@contextlib.contextmanager
def flocked(path: Path, flags: int = os.O_RDONLY) -> Iterator[None]:
    """An exclusive `fcntl.flock` on `path` (a file, or a folder itself) for the block, waiting for other
    holders; it is dropped when the descriptor closes, also if the process dies."""
    fd = os.open(path, flags, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def is_lock_file(name: str) -> bool:
    """True for the lock file and its short-lived rewrite temp files: never data, never uploaded."""
    return name == LOCK_NAME or name.startswith(LOCK_NAME + "-")


def lock_dir() -> Path:
    """Where URL locks and the take-over guard live: $VLMFT_LOCK_DIR, else <temp dir>/vlmft-locks."""
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "vlmft-locks")


def _is_url(target: str) -> bool:
    return "://" in target and not target.startswith("file://")


def lock_path(target: str | Path) -> Path:
    """The lock file for a local folder (inside it) or a URL (in the lock directory, keyed by its hash)."""
    target = str(target)
    if _is_url(target):
        url = target.rstrip("/")
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", url)[-80:]
        return lock_dir() / f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:16]}.lock"
    return Path(os.path.realpath(target.removeprefix("file://"))) / LOCK_NAME


def _process_entry(pid: int) -> dict | None:
    """{pid, create_time} of a running process, or None when it is gone."""
    try:
        return {"pid": pid, "create_time": psutil.Process(pid).create_time()}
    except psutil.NoSuchProcess:
        return None


def _alive(entry: dict) -> bool:
    """Is this exact process (PID and create time) still running? A zombie is not; unknown counts as yes."""
    try:
        proc = psutil.Process(entry["pid"])
        same = abs(proc.create_time() - entry["create_time"]) < _CREATE_TIME_TOLERANCE
        return same and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def read_holder(path: Path) -> dict | None:
    """The lock file's JSON; None when there is no lock file; {} when it cannot be read as a lock."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) and "pids" in info else {}


def describe(holder: dict) -> str:
    """One line naming a holder: PID, host, start time and command."""
    command = " ".join(str(holder.get("command")).split())
    command = command if len(command) <= 300 else command[:300] + "..."
    return f"PID {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')}, command: {command})"


class FolderLock:
    """An exclusive lock on a local folder or a URL; use as `with FolderLock(target, "training run") as lock:`.

    `took_over` is None, or the one line (also logged here) naming the dead holder whose stale lock
    this one replaced, for the caller to repeat in its own log.
    """

    def __init__(self, target: str | Path, what: str):
        self.target, self.what = str(target), what
        self.path = lock_path(target)
        self.took_over: str | None = None
        self._info: dict | None = None

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Serialise check-and-take-over (and rewrites) among the processes of this host.

        One guard file for every lock of the host: each hold lasts a few system calls, and a file per
        lock would pile up (one per uploaded checkpoint prefix). flock works on a read-only file
        descriptor, so every user of the machine can take it.
        """
        folder = lock_dir()
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            if not os.environ.get(LOCK_DIR_ENV):  # the default is shared by every user, like the temp dir itself
                with contextlib.suppress(OSError):
                    folder.chmod(0o1777)
        with flocked(folder / "guard", os.O_RDONLY | os.O_CREAT):
            yield

    def _held_error(self, holder: dict) -> LockHeld:
        where = self.target if _is_url(self.target) else self.path.parent
        if not holder:
            return LockHeld(f"{where} is locked for another writer, but its lock file {self.path} cannot be read; "
                            f"if no run writes there any more, remove {self.path}")
        alive = [e["pid"] for e in holder["pids"] if e["pid"] != holder["pid"] and _alive(e)]
        also = f"; its processes {alive} still run" if alive and holder.get("host") == socket.gethostname() else ""
        return LockHeld(
            f"{where} is locked by another {holder.get('what', 'writer')}: {describe(holder)}{also}. Wait for it to "
            f"finish (or stop it); if that run is gone from host {holder.get('host')}, remove {self.path}"
        )

    def acquire(self) -> FolderLock:
        """Take the lock, or a stale one over; raise LockHeld naming the live holder."""
        if self._info is not None:
            raise RuntimeError(f"{self.path}: this lock is already held by this object")
        me = _process_entry(os.getpid())
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        info = {"what": self.what, "target": self.target, "pid": me["pid"], "host": socket.gethostname(),
                "create_time": me["create_time"], "started": started, "command": " ".join(psutil.Process().cmdline()),
                "token": uuid.uuid4().hex, "pids": [me]}
        with self._guard():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(3):  # a lock removed or replaced under us by another host: look again
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    holder = read_holder(self.path)
                    if holder is None:
                        continue
                    if not holder or holder.get("host") != socket.gethostname() or any(map(_alive, holder["pids"])):
                        raise self._held_error(holder) from None
                    self.took_over = (f"{self.target}: took over the lock of a {holder.get('what', 'writer')} that is "
                                      f"gone: {describe(holder)}")
                    log.warning(self.took_over)
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                with os.fdopen(fd, "w") as f:
                    json.dump(info, f, indent=1)
                self._info = info
                return self
        raise self._held_error(read_holder(self.path) or {})

    def add_pid(self, pid: int) -> None:
        """Keep the lock alive while process `pid` runs too (e.g. the training launcher)."""
        entry = _process_entry(pid)
        if self._info is None or entry is None:
            return
        with self._guard():
            if (read_holder(self.path) or {}).get("token") != self._info["token"]:
                raise LockHeld(f"{self.path} is no longer held by this process (taken over or removed); stop writing")
            self._info["pids"].append(entry)
            tmp = self.path.with_name(f"{LOCK_NAME}-{uuid.uuid4().hex[:12]}")
            tmp.write_text(json.dumps(self._info, indent=1))
            os.replace(tmp, self.path)

    def release(self) -> None:
        """Remove the lock file, if it is still ours; a no-op when not held."""
        if self._info is None:
            return
        with self._guard():
            holder = read_holder(self.path)
            if holder and holder.get("token") == self._info["token"]:
                self.path.unlink()
            else:
                log.warning("%s: the lock is no longer ours (%s); left in place", self.target,
                            describe(holder) if holder else "removed")
        self._info = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
