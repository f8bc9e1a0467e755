"""Checkpoints: which are complete, uploading them while training runs, resuming from storage.

The Trainer writes `checkpoint-N/` folders file by file; a folder counts as complete only once the
training process has written `checkpoint_complete.json` into it after the save returned (on every
rank). Only complete checkpoints are uploaded, to `{storage.url}/runs/{name}-{identity[:8]}/checkpoint-N/` (the run id; vlm_core.identity), with
the checksum manifest written last (vlm_core.storage), so a reader of the bucket never mistakes a
partial upload for a checkpoint. Losing the training machine then loses at most one save interval.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

from vlm_core.config import ConfigError
from vlm_core.lock import LockHeld
from vlm_core.storage import StorageError, download_folder, list_complete, upload_folder

COMPLETE_MARKER = "checkpoint_complete.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(name: str) -> int | None:
    m = _STEP.match(name)
    return int(m.group(1)) if m else None


def mark_complete(folder: Path, step: int, identity: str | None = None) -> None:
    """Called by the training process once a checkpoint's save has returned; records the run identity."""
    tmp = folder / (COMPLETE_MARKER + ".tmp")
    tmp.write_text(json.dumps({"step": step, "time": time.time(), "identity": identity}))
    tmp.replace(folder / COMPLETE_MARKER)


def checkpoint_identity(folder: Path) -> str | None:
    """The run identity a complete checkpoint was written by (None: unknown, or not complete)."""
    marker = folder / COMPLETE_MARKER
    return json.loads(marker.read_text()).get("identity") if marker.is_file() else None


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete `checkpoint-N` folders under output_dir, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(checkpoint_step(p.name), p) for p in out.iterdir() if p.is_dir() and (p / COMPLETE_MARKER).is_file()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def latest_complete(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in a local run folder, or None."""
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def resolve_resume(resume_from: str, output_dir: str | Path, identity: str | None = None) -> Path | None:
    """The checkpoint train.resume_from asks for: the newest complete one ('auto'), none, or the given folder.

    With `identity`, 'auto' refuses a newest checkpoint written by another run identity.
    """
    if resume_from == "none":
        return None
    if resume_from == "auto":
        found = latest_complete(output_dir)
        if found is not None and identity is not None and checkpoint_identity(found) != identity:
            raise ConfigError(
                f"{found} was written by run {str(checkpoint_identity(found))[:12]}, not by this run ({identity[:12]}); "
                "use a new train.output_dir, or train.resume_from=PATH to continue it on purpose"
            )
        return found
    path = Path(resume_from)
    if not (path / COMPLETE_MARKER).is_file():
        raise ConfigError(f"train.resume_from={resume_from}: not a complete checkpoint (no {COMPLETE_MARKER})")
    return path


def run_url(storage_url: str, run_id: str) -> str:
    return f"{storage_url.rstrip('/')}/runs/{run_id}"


def newest_checkpoint(output_dir: str | Path, storage_url: str = "", run_id: str = "") -> str | None:
    """The run's newest complete checkpoint: a local folder in output_dir, else a URL in storage, else None.

    The one place that decides "newest complete checkpoint": resume, merge and consolidation all ask here.
    """
    if (local := latest_complete(output_dir)) is not None:
        return str(local)
    if not storage_url:
        return None
    return newest_in_storage(storage_url, run_id)


def newest_in_storage(storage_url: str, run_id: str) -> str | None:
    """The URL of the run's newest complete checkpoint in storage, or None."""
    base = run_url(storage_url, run_id)
    steps = [s for s in map(checkpoint_step, list_complete(base, "checkpoint-")) if s is not None]
    return f"{base}/checkpoint-{max(steps)}" if steps else None


def upload_new_checkpoints(output_dir: str | Path, storage_url: str, run_id: str) -> list[str]:
    """Upload every complete local checkpoint that storage does not hold complete yet."""
    base = run_url(storage_url, run_id)
    remote = set(list_complete(base, "checkpoint-"))
    sent = []
    for ckpt in complete_checkpoints(output_dir):
        if ckpt.name in remote:
            continue
        try:
            upload_folder(ckpt, f"{base}/{ckpt.name}")
        except StorageError:
            if not ckpt.exists():  # rotated away by save_total_limit while uploading: a newer one exists
                continue
            raise
        sent.append(ckpt.name)
    return sent


def fetch_latest_checkpoint(storage_url: str, run_id: str, output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint as a local folder: output_dir's own, else downloaded from storage."""
    found = newest_checkpoint(output_dir, storage_url, run_id)
    if found is None or "://" not in found:
        return None if found is None else Path(found)
    dest = Path(output_dir) / found.rsplit("/", 1)[1]
    download_folder(found, dest)
    if not (dest / COMPLETE_MARKER).is_file():
        raise StorageError(f"{found} has no {COMPLETE_MARKER}; it was not a complete checkpoint")
    return dest


class CheckpointUploader:
    """Uploads new complete checkpoints from a background thread while training runs.

    A failed pass (storage error, or another process uploading to the same checkpoint prefix) does
    not stop training: the next pass retries, and `failed_passes` / `last_error` tell the caller what
    went wrong. `stop()` makes a final pass (so the last checkpoint goes up too)
    and raises if that final pass fails.
    """

    def __init__(self, output_dir: str | Path, storage_url: str, run_id: str, interval: float = 5.0):
        self.output_dir, self.storage_url, self.run_id, self.interval = output_dir, storage_url, run_id, interval
        self.uploaded: list[str] = []
        self.failed_passes = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="checkpoint-uploader", daemon=True)

    def start(self) -> CheckpointUploader:
        self._thread.start()
        return self

    def _pass(self) -> None:
        self.uploaded += upload_new_checkpoints(self.output_dir, self.storage_url, self.run_id)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._pass()
            except (StorageError, LockHeld) as exc:  # training goes on; the next pass retries
                self.failed_passes += 1
                self.last_error = str(exc)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join()
        self._pass()
        return self.uploaded
