"""Checkpoints without a shared folder: every rank uploads its own files; complete once all ranks have.

With `train.shared_output_dir=false` each node writes its checkpoints into a folder of its own (the
same path, another disk), so no single process can see a whole checkpoint: ZeRO's optimizer
partitions (`zero_pp_rank_{R}_...`) and the Trainer's RNG states (`rng_state_{R}.pth`) lie on the
disk of the node that ran rank R. The task process on the head node cannot read the other disks, so
the training processes upload, each from its own node:

* rank R uploads the files of rank R; rank 0 also uploads the files every rank shares (model
  states, trainer state, scheduler, adapter, `latest`, `checkpoint_complete.json` ...), to
  `{storage.url}/runs/{run_id}/checkpoint-N/`, from a background thread (training goes on);
* then it writes its marker `.ranks/rank{R}.json` there: the files it sent with their checksums and
  the launch they belong to (a marker left by an earlier, killed launch never counts);
* whichever rank finds all `world_size` markers of its launch writes the checksum manifest
  (vlm_core.storage), the one completion file every reader goes by. Two ranks writing it at once
  write the same bytes.

On resume (a new launch, perhaps on fresh nodes), rank 0 picks the newest complete checkpoint in
storage and tells the others; each node's local rank 0 fetches the shared files and every rank its
own partition (not elastic: DeepSpeed ZeRO-1/2/3 load only their own rank's optimizer file), before
the Trainer starts. Local checkpoints newer than that one are removed: they were never complete on
every node. The node-local save itself is DeepSpeed's `checkpoint.use_node_local_storage` (model
states written on every node) and the Trainer's `save_on_each_node` (vlm_core.train).
"""

from __future__ import annotations

import json
import posixpath
import queue
import re
import shutil
import threading
import time
from pathlib import Path

import fsspec

from vlm_core.checkpoints import checkpoint_step, newest_in_storage
from vlm_core.lock import is_lock_file
from vlm_core.storage import (
    StorageError,
    download_folder,
    is_complete,
    put_files,
    with_retries,
    write_checksums,
)

RANKS_DIR = ".ranks"
_OWNED = re.compile(r"zero_pp_rank_(\d+)_|^rng_state_(\d+)\.pth$")


def file_owner(rel: str) -> int | None:
    """The rank whose file this is (its ZeRO partition, its RNG state), or None for a file all ranks share."""
    m = _OWNED.search(posixpath.basename(rel))
    return None if m is None else int(m.group(1) or m.group(2))


def rank_files(folder: Path, rank: int) -> list[str]:
    """The files of `folder` that rank `rank` uploads: its own, and for rank 0 also the shared ones."""
    rels = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and not is_lock_file(p.name)
                  and not p.name.endswith(".tmp"))
    return [r for r in rels if file_owner(r) == rank or (rank == 0 and file_owner(r) is None)]


def _marker(url: str, rank: int) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of rank `rank`'s marker in checkpoint `url`."""
    fs, root = fsspec.core.url_to_fs(url)
    return fs, f"{root.rstrip('/')}/{RANKS_DIR}/rank{rank}.json"


def complete_if_all_ranks(url: str, world_size: int, launch: str) -> bool:
    """Write the checksum manifest of checkpoint `url` when every rank of `launch` has left its marker."""
    files: dict[str, dict] = {}
    for rank in range(world_size):
        fs, path = _marker(url, rank)
        fs.invalidate_cache()
        try:
            marker = json.loads(fs.cat_file(path))
        except FileNotFoundError:
            return False
        if marker.get("launch") != launch:
            return False  # an earlier launch's marker: that rank has not uploaded for this one yet
        files.update(marker["files"])
    write_checksums(url, files)
    return True


def publish_rank_files(folder: Path, base_url: str, rank: int, world_size: int, launch: str) -> bool:
    """Upload this rank's files of a checkpoint and its marker; True when the checkpoint is complete after."""
    url = f"{base_url}/{folder.name}"
    if is_complete(url):
        return True
    files = put_files(folder, rank_files(folder, rank), url)
    marker = json.dumps({"rank": rank, "world_size": world_size, "launch": launch, "files": files}).encode()
    fs, path = _marker(url, rank)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with_retries(lambda: fs.pipe_file(path, marker), url, f"writing the rank {rank} marker of")
    return complete_if_all_ranks(url, world_size, launch)


class RankUploader:
    """This rank's checkpoint uploads, one checkpoint after another, from a background thread.

    A failed upload is retried `retries` times, `interval` seconds apart, then given up (a newer
    checkpoint will come); a checkpoint folder rotated away meanwhile (train.save_total_limit) is
    skipped. `close()` uploads what is queued and returns the names completed by this rank's pass."""

    def __init__(self, base_url: str, rank: int, world_size: int, launch: str, retries: int = 3, interval: float = 2.0):
        self.base_url, self.rank, self.world_size, self.launch = base_url, rank, world_size, launch
        self.retries, self.interval = retries, interval
        self.completed: list[str] = []
        self.errors: list[str] = []
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="rank-checkpoint-uploader", daemon=True)
        self._thread.start()

    def submit(self, folder: Path) -> None:
        self._queue.put(folder)

    def _loop(self) -> None:
        while (folder := self._queue.get()) is not None:
            for attempt in range(self.retries + 1):
                if not folder.is_dir():
                    break
                try:
                    if publish_rank_files(folder, self.base_url, self.rank, self.world_size, self.launch):
                        self.completed.append(folder.name)
                    break
                except (StorageError, OSError) as exc:
                    if not folder.is_dir():
                        break
                    if attempt == self.retries:
                        self.errors.append(f"{folder.name}: {exc}")
                    else:
                        time.sleep(self.interval)

    def close(self) -> list[str]:
        self._queue.put(None)
        self._thread.join()
        return self.completed


def fetch_own_files(url: str, dest: Path, rank: int, shared: bool) -> None:
    """This rank's files of the checkpoint at `url` (and the shared ones when `shared`) into `dest`."""
    download_folder(url, dest, select=lambda rel: file_owner(rel) == rank or (shared and file_owner(rel) is None))


def drop_newer(output_dir: Path, step: int) -> list[str]:
    """Remove local checkpoint folders after `step`: never complete on every node, and in the way of the
    Trainer, which saves them again."""
    gone = []
    for p in sorted(output_dir.glob("checkpoint-*")):
        s = checkpoint_step(p.name)
        if s is not None and s > step and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


def resume_from_storage(storage_url: str, run_id: str, output_dir: Path, rank: int, local_rank: int) -> Path | None:
    """Every rank: the newest complete checkpoint in storage (rank 0's choice), with this node's files of it
    fetched into output_dir; None when storage holds none. A collective: every rank calls it."""
    import torch.distributed as dist

    box = [newest_in_storage(storage_url, run_id) if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    url = box[0]
    step = -1 if url is None else checkpoint_step(url.rsplit("/", 1)[1])
    if local_rank == 0:
        drop_newer(output_dir, step)
    if dist.is_initialized():
        dist.barrier()
    if url is None:
        return None
    dest = output_dir / url.rsplit("/", 1)[1]
    fetch_own_files(url, dest, rank, shared=local_rank == 0)
    if dist.is_initialized():
        dist.barrier()  # every node's shared files are there before any rank reads them
    return dest


def launch_token(rank: int) -> str:
    """One token for all ranks of this launch (rank 0's), which their upload markers carry."""
    import uuid

    import torch.distributed as dist

    box = [uuid.uuid4().hex if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]
