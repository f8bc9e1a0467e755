"""Checkpoints: which are complete, uploading them while training runs, resuming from storage.

The Trainer writes `checkpoint-N/` folders file by file; a folder counts as complete only once the
training process has written `checkpoint_complete.json` into it after the save returned (on every
rank). Only complete checkpoints are uploaded, to `{storage.url}/runs/{run_id}/checkpoint-N/`, with
the checksum manifest written last (vlm_core.storage), so a reader of the bucket never mistakes a
partial upload for a checkpoint. Losing the training machine then loses at most one save interval.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

from vlm_core.storage import StorageError, download_folder, list_complete, upload_folder

COMPLETE_MARKER = "checkpoint_complete.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(name: str) -> int | None:
    m = _STEP.match(name)
    return int(m.group(1)) if m else None


def mark_complete(folder: Path, step: int) -> None:
    """Called by the training process once a checkpoint's save has returned."""
    tmp = folder / (COMPLETE_MARKER + ".tmp")
    tmp.write_text(json.dumps({"step": step, "time": time.time()}))
    tmp.replace(folder / COMPLETE_MARKER)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete `checkpoint-N` folders under output_dir, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(checkpoint_step(p.name), p) for p in out.iterdir() if p.is_dir() and (p / COMPLETE_MARKER).is_file()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def latest_complete(output_dir: str | Path) -> Path | None:
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def run_url(storage_url: str, run_id: str) -> str:
    return f"{storage_url.rstrip('/')}/runs/{run_id}"


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
    """When output_dir holds no complete checkpoint, download the newest complete one from storage."""
    if (local := latest_complete(output_dir)) is not None:
        return local
    base = run_url(storage_url, run_id)
    names = [n for n in list_complete(base, "checkpoint-") if checkpoint_step(n) is not None]
    if not names:
        return None
    newest = max(names, key=checkpoint_step)
    dest = Path(output_dir) / newest
    download_folder(f"{base}/{newest}", dest)
    if not (dest / COMPLETE_MARKER).is_file():
        raise StorageError(f"{base}/{newest} has no {COMPLETE_MARKER}; it was not a complete checkpoint")
    return dest


class CheckpointUploader:
    """Uploads new complete checkpoints from a background thread while training runs.

    `stop()` makes a final pass (so the last checkpoint goes up too) and re-raises the last upload
    error, if the final pass failed as well.
    """

    def __init__(self, output_dir: str | Path, storage_url: str, run_id: str, interval: float = 5.0):
        self.output_dir, self.storage_url, self.run_id, self.interval = output_dir, storage_url, run_id, interval
        self.uploaded: list[str] = []
        self.errors: list[str] = []
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
            except StorageError as exc:
                self.errors.append(str(exc))  # training goes on; the next pass retries

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join()
        self._pass()
        return self.uploaded
