"""Streaming loader: WebDataset shards (local or any fsspec URL, e.g. s3://) → collated batches.

Why streaming: object storage serves a few large sequential reads far faster than one request per
image, and no rank needs the data set on local disk. Why not plain `webdataset.WebDataset`: a
distributed run needs guarantees it does not give: every rank takes exactly the same number of
steps (DeepSpeed hangs otherwise), every sample of an epoch is seen once, the order is a function
of (seed, epoch), and a resumed run continues exactly where the checkpoint was taken. We keep
webdataset's tar reader (`tar_file_expander`, `group_by_keys`) and shuffle buffer, fsspec for I/O,
and plan the epoch ourselves from the manifest's per-shard sample counts:

* The epoch's sample sequence is the shards in a seeded order (`data.shuffle_shards`), each read
  front to back. It is padded, by repeating its first samples, to a multiple of
  world_size × num_workers × batch_size, then cut into equal contiguous slices, one per
  (rank, worker). **Pad, not drop**: no sample is lost from an epoch; every rank and worker yields
  the same number of full batches, so all ranks take the same number of steps and the DataLoader's
  round-robin over workers is deterministic; the cost is fewer than that many repeats per epoch
  (counted in `DataStats.padded`).
* Each slice is shuffled with a seeded buffer (`data.shuffle_buffer`), batched and collated inside
  its worker. The DataLoader takes batch k from worker k mod num_workers, so the rank's stream is a
  pure function of (seed, epoch, rank).
* Resume: `LoaderState(epoch, samples_consumed)` says where a rank stands; a training entry point
  saves it with a checkpoint (or derives it from the step count with `state_after`) and passes it
  back. Each worker then skips, without decoding, the samples it had already produced, and the
  workers are rotated so the continuation is the same stream as without the interruption.
* A sample that cannot be trained on (too long, cut inside an image, no supervised token, bad
  image) is skipped, logged with its source, counted, and its slot is filled by the next good sample
  of the same worker, so step counts and resume positions stay exact. Counters travel with every
  batch (`batch["data_stats"]`) because workers are separate processes; sum them with
  `DataStats.add` and log `as_dict()`.
* Packing (`train.packing`, vlm_core.data.packing) is the collator's: it lays out each micro-batch's
  samples in rows, so positions, steps and resume are the same as unpacked. The stream only checks
  that each sample fits a packed row, and stops with an error naming the shard, key and the setting
  to raise when one does not (a sample is never dropped for its size).

Use `make_dataloader` (batch_size=None: batches come collated from the dataset; workers not
persistent, so `set_epoch` reaches them). With the HF Trainer, return it from an overridden
`get_train_dataloader` without `accelerator.prepare`: accelerate would otherwise dispatch an
IterableDataset from rank 0 or re-split it with `IterableDatasetShard`, and this dataset is already
split by rank.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from itertools import islice
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle as wds_shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from vlm_core.data.manifest import read_manifest
from vlm_core.data.packing import check_fits
from vlm_core.data.preprocess import ModelSample, Preprocessor
from vlm_core.data.sample import ShardSample
from vlm_core.data.template import SampleRejected

log = logging.getLogger(__name__)

READ_BLOCK_SIZE = 8 << 20  # bytes per read from object storage: few, large requests


@dataclass
class DataStats:
    """Counters the training loop logs: what the loader trained on, cut, skipped and repeated."""

    samples: int = 0  # samples yielded for training (including the repeats below)
    images: int = 0
    tiles: int = 0  # image tiles (dummy tiles of text-only samples not included)
    text_only: int = 0  # samples that got a dummy tile
    truncated: int = 0  # cut at data.max_seq_length and still trained
    skipped_too_long: int = 0  # longer than data.max_seq_length under data.overlong=skip
    skipped_image_cut: int = 0  # the cut would fall inside an image span
    skipped_no_labels: int = 0  # no supervised token (no reply, or all of it past the cut)
    skipped_invalid: int = 0  # undecodable image, missing member, placeholder/image count mismatch
    replaced: int = 0  # repeats of a good sample standing in for a skipped one
    padded: int = 0  # repeats that make every rank/worker take the same number of steps

    def add(self, other: DataStats | dict[str, int]) -> DataStats:
        """Add another set of counters (or its dict) into this one; returns self."""
        values = other if isinstance(other, dict) else asdict(other)
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + int(values.get(f.name, 0)))
        return self

    @property
    def skipped(self) -> int:
        return self.skipped_too_long + self.skipped_image_cut + self.skipped_no_labels + self.skipped_invalid

    def as_dict(self, prefix: str = "data/") -> dict[str, int]:
        """Flat counters for a metrics logger, e.g. {'data/truncated': 3, ...}."""
        out = {f"{prefix}{k}": v for k, v in asdict(self).items()}
        out[f"{prefix}skipped"] = self.skipped
        return out


_REASON_FIELD = {
    "too_long": "skipped_too_long",
    "image_cut": "skipped_image_cut",
    "no_labels": "skipped_no_labels",
    "invalid": "skipped_invalid",
}


@dataclass(frozen=True)
class LoaderState:
    """Where a rank stands: the epoch and how many of its samples in that epoch were trained on."""

    epoch: int = 0
    samples_consumed: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoaderState:
        return cls(epoch=int(data["epoch"]), samples_consumed=int(data["samples_consumed"]))


@dataclass(frozen=True)
class ShardRun:
    """Samples [start, stop) of one shard (in file order); padding marks repeats that fill the epoch."""

    url: str
    start: int
    stop: int
    padding: bool = False


def samples_per_worker(total: int, world_size: int, num_workers: int, batch_size: int) -> int:
    """Samples each (rank, worker) yields per epoch: ceil(total / (world · workers · batch)) · batch."""
    if total <= 0:
        raise ValueError("the shard set has no samples (manifest counts are 0); prepare the data first")
    consumers = world_size * max(1, num_workers)
    return math.ceil(total / (consumers * batch_size)) * batch_size


def epoch_plan(
    shards: list[tuple[str, int]],
    epoch: int,
    seed: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
    shuffle_shards: bool = True,
) -> list[list[ShardRun]]:
    """The runs each consumer (index rank · workers + worker) reads this epoch; index-only, no I/O."""
    order = list(range(len(shards)))
    if shuffle_shards:
        random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    sequence = [(shards[i][0], shards[i][1]) for i in order if shards[i][1] > 0]
    total = sum(n for _, n in sequence)
    per = samples_per_worker(total, world_size, num_workers, batch_size)
    consumers = world_size * max(1, num_workers)
    plans: list[list[ShardRun]] = [[] for _ in range(consumers)]
    position = 0  # index into the (padded, wrapped) epoch sequence
    for c in range(consumers):
        need = per
        while need:
            lap, offset = divmod(position, total)
            for url, count in sequence:  # find the shard holding `offset`
                if offset < count:
                    take = min(count - offset, need)
                    plans[c].append(ShardRun(url, offset, offset + take, padding=lap > 0))
                    break
                offset -= count
            position += take
            need -= take
    return plans


def _open(url: str):
    """A shard opened for one sequential pass; remote files fetch the next block while this one is parsed."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return open(path, "rb")
    return fs.open(path, "rb", block_size=READ_BLOCK_SIZE, cache_type="background")


def iter_shard(run: ShardRun) -> Iterator[dict[str, Any]]:
    """Raw samples start..stop-1 of a shard ({'__key__', 'json': bytes, 'img0.jpg': bytes, ...}), undecoded.

    Reads the tar front to back (a tar has no index) and stops after `stop`, closing the file.
    """
    with _open(run.url) as stream:
        samples = group_by_keys(tar_file_expander([{"url": run.url, "stream": stream}]))
        index = -1
        for index, sample in enumerate(islice(samples, run.stop)):
            if index >= run.start:
                sample["__padding__"] = run.padding
                yield sample
    if index + 1 < run.stop:
        raise ValueError(
            f"{run.url}: the manifest promises at least {run.stop} samples but the shard has {index + 1}; the shard "
            "set is inconsistent (re-run the prepare step to rewrite shards and manifest)"
        )


def _worker_rng(seed: int, epoch: int, rank: int, worker: int) -> random.Random:
    return random.Random(f"buffer-{seed}-{epoch}-{rank}-{worker}")


class ShardStream(IterableDataset):
    """Collated training batches from WebDataset shards, split by rank and DataLoader worker.

    shards: (url, sample count) per shard, from the manifest (`from_folder` reads it).
    preprocess: turns a shard record and its members into a `ModelSample` (`Preprocessor`).
    collate: batches `ModelSample`s (`Collator`).
    num_workers: the DataLoader workers that will read this dataset (`make_dataloader` uses it);
        with a DataLoader of 0 workers the main process produces the identical stream.
    rank / world_size: default to the RANK / WORLD_SIZE environment variables (torchrun, deepspeed).
    pack: (train.pack_max_tokens, train.pack_max_tiles) when the collator packs; every sample's tiles are checked to fit a row.
    """

    def __init__(
        self,
        shards: list[tuple[str, int]],
        preprocess: Preprocessor,
        collate: Callable[[list[ModelSample]], dict[str, Any]],
        batch_size: int = 1,
        *,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        state: LoaderState | None = None,
        pack: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.pack = pack
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in 0..{self.world_size - 1} (check RANK / WORLD_SIZE)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1 (train.per_device_batch_size)")
        self.shards = list(shards)
        self.preprocess, self.collate, self.batch_size = preprocess, collate, batch_size
        self.seed, self.shuffle_buffer, self.shuffle_shards = seed, shuffle_buffer, shuffle_shards
        self.num_workers = num_workers
        self.total_samples = sum(n for _, n in self.shards)
        self.per_worker = samples_per_worker(self.total_samples, self.world_size, num_workers, batch_size)
        self.state = state or LoaderState()
        self.load_state(self.state)

    @classmethod
    def from_folder(cls, folder: str, preprocess: Preprocessor, collate: Callable, split: str = "train", **kw):
        """The dataset over the shards listed in `folder`/manifest.json (a path or fsspec URL)."""
        manifest = read_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(
                f"{folder.rstrip('/')}/manifest.json not found: the shard set is missing or incomplete "
                "(data.shards); run the prepare step (vlmft prepare) first"
            )
        info = getattr(manifest, split)
        shards = list(zip(manifest.shard_urls(folder, split), [s.samples for s in info.shards], strict=True))
        if not shards:
            raise ValueError(f"{folder}/manifest.json: the {split} split has no shards")
        return cls(shards, preprocess, collate, **kw)

    # ----------------------------------------------------------------------------------------
    # lengths and state

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank yields per epoch (the same on every rank)."""
        return self.per_worker * max(1, self.num_workers)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        return self.samples_per_epoch // self.batch_size

    def load_state(self, state: LoaderState) -> None:
        """Continue from `state` on the next iteration (epoch and samples already trained on)."""
        if not 0 <= state.samples_consumed <= self.samples_per_epoch:
            raise ValueError(
                f"loader state {state}: samples_consumed must be within 0..{self.samples_per_epoch} (samples per "
                "epoch on this rank); was the checkpoint taken with another world size, batch size or worker count?"
            )
        self.state = state

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (unless a loaded state is already inside this epoch)."""
        if epoch != self.state.epoch:
            self.state = LoaderState(epoch, 0)

    def state_after(self, batches: int) -> LoaderState:
        """The state after `batches` micro-batches since the start of training (epoch 0, sample 0)."""
        epoch, done = divmod(batches, len(self))
        return LoaderState(epoch, done * self.batch_size)

    # ----------------------------------------------------------------------------------------
    # iteration

    def _consumed_by(self, worker: int) -> int:
        """Samples logical worker `worker` had produced when the rank had consumed state.samples_consumed."""
        workers = max(1, self.num_workers)
        full, partial = divmod(self.state.samples_consumed, self.batch_size)
        rounds, extra = divmod(full, workers)
        done = rounds * self.batch_size + (self.batch_size if worker < extra else 0)
        return done + (partial if worker == extra else 0)

    def _samples(self, worker: int, skip: int, stats: DataStats) -> Iterator[ModelSample]:
        """Logical worker's preprocessed samples after the first `skip` (skipped without decoding)."""
        epoch = self.state.epoch
        plan = epoch_plan(
            self.shards, epoch, self.seed, self.world_size, self.num_workers, self.batch_size, self.shuffle_shards
        )[self.rank * max(1, self.num_workers) + worker]
        raw: Iterator[dict[str, Any]] = (s for run in plan for s in iter_shard(run))
        if self.shuffle_buffer > 1:
            rng = _worker_rng(self.seed, epoch, self.rank, worker)
            raw = wds_shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(raw)
        pending, last_good = 0, None
        for item in islice(raw, skip, None):
            stats.padded += int(item["__padding__"])
            try:
                sample = self._preprocess(item)
            except SampleRejected as exc:
                setattr(stats, _REASON_FIELD[exc.reason], getattr(stats, _REASON_FIELD[exc.reason]) + 1)
                log.warning("sample skipped (%s): %s [%s %s]", exc.reason, exc, item.get("__url__"), item["__key__"])
                pending += 1
                continue
            if self.pack is not None:
                check_fits(sample, self.pack[1], where=f"{item.get('__url__')} key {item['__key__']}")
            last_good = sample
            stats.replaced += pending
            for _ in range(1 + pending):
                yield sample
            pending = 0
        if pending:
            if last_good is None:
                raise RuntimeError(
                    f"rank {self.rank} worker {worker}: every sample of its slice was rejected (see the warnings "
                    "above); check the shards and data.max_seq_length"
                )
            stats.replaced += pending
            for _ in range(pending):
                yield last_good

    def _preprocess(self, item: dict[str, Any]) -> ModelSample:
        where = f"{item.get('__url__')} key {item['__key__']}"
        try:
            record = ShardSample.model_validate(json.loads(item["json"]))
        except KeyError:
            raise SampleRejected("invalid", f"{where}: no .json record") from None
        except ValueError as exc:
            raise SampleRejected("invalid", f"{where}: bad .json record: {exc}") from None
        members = {k: v for k, v in item.items() if isinstance(v, bytes)}
        return self.preprocess.from_shard(record, members, f"{where} ({record.source.file}:{record.source.line})")

    def _batches(self, worker: int) -> Iterator[dict[str, Any]]:
        """Logical worker's collated batches, each with the counters since its previous batch."""
        skip = self._consumed_by(worker)
        stats, sent = DataStats(), {}
        samples = self._samples(worker, skip, stats)
        size = self.batch_size - skip % self.batch_size  # finish a batch interrupted by the checkpoint
        while True:
            chunk = list(islice(samples, size))
            if not chunk:
                return
            for s in chunk:
                stats.samples += 1
                stats.images += len(s.tiles_per_image)
                stats.tiles += sum(s.tiles_per_image)
                stats.text_only += int(s.dummy_tile)
                stats.truncated += int(s.truncated)
            batch = self.collate(chunk)
            now = asdict(stats)
            batch["data_stats"] = {k: v - sent.get(k, 0) for k, v in now.items()}  # deltas: sum them
            sent = now
            yield batch
            size = self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers = max(1, self.num_workers)
        info = get_worker_info()
        first = (self.state.samples_consumed // self.batch_size) % workers  # worker of the next batch
        if info is not None:
            if info.num_workers != workers:
                raise ValueError(
                    f"the DataLoader has {info.num_workers} workers but the dataset was planned for {workers} "
                    "(num_workers); build the DataLoader with make_dataloader"
                )
            yield from self._batches((info.id + first) % workers)
            return
        # No worker processes: interleave the logical workers exactly as the DataLoader would.
        streams = [self._batches((i + first) % workers) for i in range(workers)]
        while streams:
            for stream in list(streams):
                batch = next(stream, None)
                if batch is None:
                    streams.remove(stream)
                else:
                    yield batch


def make_dataloader(dataset: ShardStream, prefetch_factor: int = 2, pin_memory: bool = False) -> DataLoader:
    """The DataLoader for a `ShardStream`: its own worker count, batches already collated."""
    workers = dataset.num_workers
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=prefetch_factor if workers else None,
        persistent_workers=False,
        pin_memory=pin_memory,
    )
