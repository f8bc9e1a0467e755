"""Annotations + images → validated WebDataset shards, `rejected.jsonl` and `manifest.json`.

Three steps, so that an orchestrator can fan the middle one out (Prefect's thread pool, Dask):

1. `plan_shards` reads every annotation (cheap: no image is opened), checks each record's
   structure, rejects duplicate ids, picks the held-out split, fingerprints inputs + settings, and
   cuts the samples into groups of `data.samples_per_shard`. A whole input that cannot give samples
   (an empty annotation file, a repeat_time that keeps no record or makes more than
   `readers.MAX_SAMPLES`) fails here, before anything is written. If `manifest.json` already holds that
   fingerprint and its shards are all there, the plan says `up_to_date` and nothing else runs.
2. `write_group` (independent per group) reads and checks the images of one group and writes its
   shard(s), each to a temporary name renamed (or uploaded) only when complete.
3. `finalize` writes `rejected.jsonl`, fails when no training sample is left or more than
   `data.max_reject_fraction` was rejected (removing the shards just written: only rejected.jsonl
   stays, to say why), and writes the manifest last: a folder without a manifest is incomplete by
   definition.

What the user should know but is not an error (an evaluation split that takes most of the data,
turn keys that training does not use) is kept as `Plan.warnings` and `Manifest.warnings`.

Writing (begin → finalize) holds the shard folder's lock (vlm_core.lock: `.vlmft.lock` in a local
folder, which no step here takes for a shard, deletes or fingerprints), so one writer at a time.

Groups come from the input order and the settings, never from the number of workers, so the same
inputs and settings give byte-identical shards however the work is spread. Training samples are
ordered by a hash of their key, which mixes data sets across shards deterministically.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
import tempfile
import uuid
from collections import Counter
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal, NoReturn

import fsspec
from fsspec.implementations.local import LocalFileSystem

from vlm_core.config import ConfigError, DataConfig, ModelConfig
from vlm_core.data.images import ImageReject, ShardImage, check_image, image_location, read_image_bytes
from vlm_core.data.manifest import MANIFEST_NAME, DatasetCounts, Manifest, ShardInfo, SplitInfo, read_manifest
from vlm_core.data.readers import (
    MAX_SAMPLES,
    DatasetSpec,
    read_bytes,
    read_meta,
    read_records,
    repeat_selection,
)
from vlm_core.data.sample import SCHEMA_VERSION, sample_key
from vlm_core.data.validate import LengthCheck, RecordReject, check_record
from vlm_core.lock import FolderLock

PREPARE_VERSION = 3  # bump when the shard bytes for the same inputs would change
REJECTED_NAME = "rejected.jsonl"
SHAPING_SETTINGS = (
    "eval_fraction", "eval_count", "samples_per_shard", "max_shard_bytes", "max_image_pixels",
    "max_seq_length", "max_dynamic_patch", "min_dynamic_patch", "use_thumbnail", "image_check", "overlong",
    "system_prompt",
)


class PrepareError(RuntimeError):
    """The prepare step as a whole failed (an empty input, no training sample left, too many rejected)."""


class SampleError(RuntimeError):
    """An unexpected error while writing one sample (not an input problem with a reject reason: a storage
    error, a bug); the message names the data set, annotation file, line, id and field. A plain message,
    so that it crosses from a worker process intact."""


@dataclass
class Unit:
    """One future shard sample: a valid record (or one repeat of it) of one data set."""

    dataset: int
    line: int
    repeat: int
    key: str
    id: str
    conversations: list[dict]
    images: list[str]


@dataclass
class Group:
    split: str
    index: int
    units: list[Unit]


@dataclass
class Plan:
    fingerprint: str
    settings: dict
    datasets: list[DatasetSpec]
    groups: list[Group] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    counts: dict[str, DatasetCounts] = field(default_factory=dict)
    manifest: Manifest | None = None
    warnings: list[str] = field(default_factory=list)  # for the log and the manifest

    @property
    def up_to_date(self) -> bool:
        return self.manifest is not None

    @property
    def total_units(self) -> int:
        return sum(len(g.units) for g in self.groups)


@dataclass
class GroupResult:
    split: str
    index: int
    shards: list[ShardInfo]
    rejects: list[dict]
    written: dict[int, int]  # data set index -> samples written


def _reject(spec: DatasetSpec, line: int, rid: str | None, reason: str, detail: str, repeat: int = 0) -> dict:
    return {"dataset": spec.name, "file": spec.annotation, "line": line, "repeat": repeat, "id": rid,
            "reason": reason, "detail": detail}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _image_stamps(spec: DatasetSpec, paths: set[str]) -> dict[str, str]:
    """A cheap content stamp per referenced image: size + ETag/mtime. A local image is stat'ed (the
    root may hold far more files than the annotation uses); a remote root is listed once."""
    fs, root = fsspec.core.url_to_fs(spec.root)
    stamps = {}
    if isinstance(fs, LocalFileSystem):
        for rel in sorted(paths):
            try:
                st = os.stat(image_location(spec.root, rel)[2])
            except ImageReject:
                stamps[rel] = "escape"
                continue
            except OSError:
                st = None
            stamps[rel] = f"{st.st_size}:{st.st_mtime}" if st and stat.S_ISREG(st.st_mode) else "missing"
        return stamps
    try:
        listing = fs.find(root, detail=True) if fs.isdir(root) else {}
    except FileNotFoundError:
        listing = {}
    for rel in sorted(paths):
        try:
            full = image_location(spec.root, rel)[2]
        except ImageReject:
            stamps[rel] = "escape"
            continue
        info = listing.get(full) or listing.get(full.lstrip("/"))
        stamps[rel] = f"{info.get('size')}:{info.get('ETag') or info.get('mtime')}" if info else "missing"
    return stamps


def _eval_warning(held: int, usable: int, data: DataConfig) -> str | None:
    """A note when the held-out split takes more than half of the usable samples."""
    if held * 2 <= usable:
        return None
    if data.eval_count is not None:
        key = f"data.eval_count={data.eval_count}"
    else:
        key = f"data.eval_fraction={data.eval_fraction}"
    return (f"{key} holds out {held} of {usable} usable samples for evaluation, leaving {usable - held} for "
            f"training; lower {key.split('=')[0]}")


def _read_dataset(spec: DatasetSpec, data: DataConfig, planned: int) -> tuple[bytes, list, int]:
    """(annotation bytes, records, records used) of one data set; an input that cannot give samples fails."""
    where = f"data set {spec.name!r}: annotation {spec.annotation}"
    raw = read_bytes(spec.annotation, where, "the annotation file (JSONL, or a JSON list) in it")
    records = read_records(spec, raw)
    n = len(records)
    if not n:
        fix = "fill it" if spec.annotation == data.meta else f"fill it or remove the data set from data.meta={data.meta}"
        raise PrepareError(f"{where} has no records (an empty file, blank lines only, or an empty list); {fix}")
    used, copies = repeat_selection(n, spec.repeat_time)
    if not used:
        raise PrepareError(f"data set {spec.name!r}: repeat_time={spec.repeat_time:g} keeps floor({n} x "
                           f"{spec.repeat_time:g}) = 0 of its {n} records; raise repeat_time to at least {1 / n:.3g}")
    if planned + used * copies > MAX_SAMPLES:
        before = f" ({planned + used * copies:,} with the data sets before it)" if planned else ""
        raise ConfigError(f"data.meta={data.meta}, data set {spec.name!r}: repeat_time={spec.repeat_time:g} x {used:,} "
                          f"records = {used * copies:,} training samples{before}, more than the {MAX_SAMPLES:,} one "
                          "preparation writes (each repeat is a stored copy); lower repeat_time")
    return raw, records, used


def _eval_ids(valid: list[tuple[DatasetSpec, str]], data: DataConfig) -> set[tuple[str, str]]:
    """The held-out (data set, id) pairs: the N smallest hashes, N from eval_count or eval_fraction."""
    n = data.eval_count if data.eval_count is not None else round(data.eval_fraction * len(valid))
    if data.eval_count is None and data.eval_fraction > 0 and len(valid) > 1:
        n = max(n, 1)
    n = min(n, max(len(valid) - 1, 0))  # always keep something to train on
    ranked = sorted(valid, key=lambda v: _sha(f"eval\0{v[0].name}\0{v[1]}"))
    return {(spec.name, rid) for spec, rid in ranked[:n]}


def plan_shards(data: DataConfig, extra_fingerprint: str = "") -> Plan:
    """Read and check all annotations, split train/eval, fingerprint, group. Opens no image."""
    specs = read_meta(data.meta, data.image_root)
    keys = Counter(sample_key(s.name, 0) for s in specs)
    if any(c > 1 for c in keys.values()):
        raise PrepareError(f"data.meta={data.meta}: data set names collide once reduced to [A-Za-z0-9_-]")
    settings = {k: getattr(data, k) for k in SHAPING_SETTINGS}
    rejects: list[dict] = []
    counts = {s.name: DatasetCounts() for s in specs}
    checked: list[tuple[int, int, str, object]] = []  # (dataset, line, id, CheckedRecord)
    fp_parts: list[dict] = []
    warnings: list[str] = []
    planned = 0  # training samples so far, repeats counted
    for di, spec in enumerate(specs):
        raw, records, used = _read_dataset(spec, data, planned)
        planned += used * repeat_selection(1, spec.repeat_time)[1]
        if spec.data_augment:
            warnings.append(f"data set {spec.name!r}: data_augment=true is not used (vlmft does not augment "
                            "images); its samples are trained as they are")
        extra_keys: set[str] = set()
        extra_records = 0
        counts[spec.name].lines = len(records)
        counts[spec.name].selected = used
        seen: dict[str, int] = {}
        image_paths: set[str] = set()
        for rec in records[:used]:
            if rec.reason:
                rejects.append(_reject(spec, rec.line, None, rec.reason, rec.detail or ""))
                continue
            rid = rec.record.get("id") if isinstance(rec.record, dict) else None
            try:
                ok = check_record(rec.record)
            except RecordReject as exc:
                rejects.append(_reject(spec, rec.line, None if rid is None else str(rid), exc.reason, exc.detail))
                continue
            sid = ok.id if ok.id is not None else f"{spec.name}:{rec.line}"
            if sid in seen:
                rejects.append(_reject(spec, rec.line, sid, "duplicate_id", f"id {sid!r} is already used on line {seen[sid]}"))
                continue
            seen[sid] = rec.line
            image_paths.update(ok.images)
            checked.append((di, rec.line, sid, ok))
            if ok.extra_turn_keys:
                extra_keys |= ok.extra_turn_keys
                extra_records += 1
        if extra_keys:
            warnings.append(f"data set {spec.name!r}: {extra_records} record(s) have turn keys besides from/value "
                            f"({', '.join(sorted(extra_keys))}); they are kept in the shard records, but training "
                            "does not use them")
        fp_parts.append({
            "name": spec.name, "root": spec.root, "annotation": spec.annotation, "repeat_time": spec.repeat_time,
            "max_dynamic_patch": spec.max_dynamic_patch, "annotation_sha256": hashlib.sha256(raw).hexdigest(),
            "images": _image_stamps(spec, image_paths),
        })
    fingerprint = _sha(json.dumps(
        {"version": PREPARE_VERSION, "schema": SCHEMA_VERSION, "settings": settings, "inputs": fp_parts,
         "extra": extra_fingerprint}, sort_keys=True))
    held_out = _eval_ids([(specs[di], sid) for di, _, sid, _ in checked], data)
    note = _eval_warning(len(held_out), len(checked), data)
    if note:
        warnings.append(note)
    plan = Plan(fingerprint, settings, specs, rejects=rejects, counts=counts, warnings=warnings)
    existing = read_manifest(data.shards)
    if existing is not None and existing.fingerprint == fingerprint and _shards_present(data.shards, existing):
        check_reject_fraction(existing.datasets, existing.rejected_by_reason, data)  # the limit may be new
        # this planning's notes: a key outside the fingerprint (data_augment) may have changed since
        plan.manifest = existing.model_copy(update={"warnings": warnings})
        return plan

    train: list[Unit] = []
    evals: list[Unit] = []
    for di, line, sid, ok in checked:
        spec = specs[di]
        if (spec.name, sid) in held_out:
            evals.append(Unit(di, line, 0, sample_key(spec.name, line), sid, ok.conversations, ok.images))
            continue
        copies = repeat_selection(1, spec.repeat_time)[1]
        train += [Unit(di, line, r, sample_key(spec.name, line, r), sid, ok.conversations, ok.images)
                  for r in range(copies)]
    train.sort(key=lambda u: _sha(u.key))
    per = data.samples_per_shard
    for split, units in (("train", train), ("eval", evals)):
        plan.groups += [Group(split, i // per, units[i : i + per]) for i in range(0, len(units), per)]
    return plan


def _shards_present(out: str, manifest: Manifest) -> bool:
    fs, root = fsspec.core.url_to_fs(out)
    try:
        sizes = {os.path.basename(p["name"].rstrip("/")): p["size"] for p in fs.ls(root, detail=True)}
    except FileNotFoundError:
        return False
    shards = manifest.train.shards + manifest.eval.shards
    return all(sizes.get(s.name) == s.bytes for s in shards)


def begin(data: DataConfig) -> None:
    """Before writing: drop the old manifest (its shards are about to change) and stale temp files."""
    fs, root = fsspec.core.url_to_fs(data.shards)
    fs.makedirs(root, exist_ok=True)
    if fs.exists(f"{root}/{MANIFEST_NAME}"):
        fs.rm(f"{root}/{MANIFEST_NAME}")
    if isinstance(fs, LocalFileSystem):
        for name in os.listdir(root):
            if ".tmp-" in name:
                os.remove(os.path.join(root, name))


def tar_size(sample: dict) -> int:
    """Bytes a sample takes in a tar: a 512-byte header per member, data padded to 512."""
    return sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if k != "__key__")


class _ShardFile:
    """One shard being written: a temp file that becomes `name` in the output only on `commit`.

    The tar is what `tarfile` (and webdataset's TarWriter) write, members in sorted order with fixed
    owner, mode and time, but each member goes out in one write, its bytes hashed on the way: the
    stdlib writer copies in 10-16 KB slices through Python, a third of the time of a `verify` run.
    (Hashing and writing on a thread of their own measured slower on a busy 2-core machine.) A test
    checks the bytes against `tarfile`'s own.
    """

    def __init__(self, out: str, name: str):
        self.fs, self.root = fsspec.core.url_to_fs(out)
        self.name = name
        self.local = isinstance(self.fs, LocalFileSystem)
        folder = self.root if self.local else tempfile.gettempdir()
        self.tmp = os.path.join(folder, f"{name}.tmp-{uuid.uuid4().hex[:12]}")
        self.file = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.samples = 0
        self.bytes = 0  # tar size so far

    def _write(self, data: bytes) -> None:
        self.sha.update(data)
        self.file.write(data)
        self.bytes += len(data)

    def add(self, sample: dict) -> None:
        key = sample["__key__"]
        for member in sorted(k for k in sample if k != "__key__"):
            data = sample[member]
            info = tarfile.TarInfo(f"{key}.{member}")
            info.size, info.mode, info.uname, info.gname = len(data), 0o444, "vlm", "vlm"
            self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))  # PAX only for a long name
            self._write(data)
            if len(data) % tarfile.BLOCKSIZE:
                self._write(tarfile.NUL * (tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE))
        self.samples += 1

    def commit(self) -> ShardInfo:
        self._write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))  # end of archive, then pad to a whole record
        if self.bytes % tarfile.RECORDSIZE:
            self._write(tarfile.NUL * (tarfile.RECORDSIZE - self.bytes % tarfile.RECORDSIZE))
        self.file.close()
        info = ShardInfo(name=self.name, samples=self.samples, bytes=self.bytes, sha256=self.sha.hexdigest())
        final = f"{self.root}/{self.name}"
        if self.local:
            os.replace(self.tmp, final)
        else:  # an object store PUT is atomic: the object appears only when complete
            try:
                self.fs.put_file(self.tmp, final)
            finally:
                os.remove(self.tmp)
        return info

    def abort(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def _encode(unit: Unit, spec: DatasetSpec, images: list[ShardImage]) -> dict:
    """The tar members of one sample. The `<key>.json` record is `sample.ShardSample` written as a plain
    dict: its parts were checked when planning (check_record) and when reading the images, and a
    pydantic round trip per sample cost as much as a user's whole `Image.verify()` loop. A test checks
    that every record written validates as a ShardSample and dumps to the same JSON."""
    members = [f"img{i}.{im.ext}" for i, im in enumerate(images)]
    record = {
        "schema_version": SCHEMA_VERSION,
        "id": unit.id,
        "conversations": unit.conversations,
        "images": [{"member": m, "path": p, "width": im.width, "height": im.height}
                   for m, p, im in zip(members, unit.images, images, strict=True)],
        "source": {"dataset": spec.name, "file": spec.annotation, "line": unit.line},
        "max_dynamic_patch": spec.max_dynamic_patch,
    }
    text = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    sample = {"__key__": unit.key, "json": text.encode("utf-8")}
    sample.update({m: im.data for m, im in zip(members, images, strict=True)})
    return sample


def _sample_error(spec: DatasetSpec, unit: Unit, where: str, exc: Exception) -> SampleError:
    return SampleError(f"data set {spec.name!r}, {spec.annotation} line {unit.line} (id {unit.id!r}, {where}): "
                       f"{type(exc).__name__}: {exc}")


def write_group(
    group: Group, datasets: list[DatasetSpec], data: DataConfig, length_check: LengthCheck | None = None
) -> GroupResult:
    """Check the images of one group and write its shard(s) to data.shards.

    An input problem rejects the sample (rejected.jsonl); anything else fails the group with a
    SampleError that names the sample's file, line and field."""
    result = GroupResult(group.split, group.index, [], [], Counter())
    part = 0
    shard: _ShardFile | None = None
    try:
        for unit in group.units:
            spec = datasets[unit.dataset]
            where = "field conversations"
            try:
                images = []
                for i, p in enumerate(unit.images):
                    where = f"field image[{i}] = {p!r}" if len(unit.images) > 1 else f"field image = {p!r}"
                    raw = read_image_bytes(spec.root, p)
                    images.append(check_image(raw, image_location(spec.root, p)[0], data.max_image_pixels,
                                              data.image_check))
                where = "field conversations"
                sizes = [(im.width, im.height) for im in images]
                too_long = length_check(unit.conversations, sizes, spec.max_dynamic_patch) if length_check else None
                if too_long:
                    result.rejects.append(_reject(spec, unit.line, unit.id, "too_long", too_long, unit.repeat))
                    continue
                sample = _encode(unit, spec, images)
            except ImageReject as exc:
                result.rejects.append(_reject(spec, unit.line, unit.id, exc.reason, exc.detail, unit.repeat))
                continue
            except (ConfigError, PrepareError):
                raise
            except Exception as exc:
                raise _sample_error(spec, unit, where, exc) from exc
            size = tar_size(sample)
            if shard and (shard.samples >= data.samples_per_shard or shard.bytes + size > data.max_shard_bytes):
                result.shards.append(shard.commit())
                shard, part = None, part + 1
            if shard is None:
                shard = _ShardFile(data.shards, f"{group.split}-{group.index:06d}-{part:03d}.tar")
            try:
                shard.add(sample)
            except Exception as exc:
                raise _sample_error(spec, unit, f"writing shard {shard.name} to {data.shards}", exc) from exc
            result.written[unit.dataset] += 1
        if shard:
            result.shards.append(shard.commit())
            shard = None
    finally:
        if shard:
            shard.abort()
    return result


def finalize(plan: Plan, results: list[GroupResult], data: DataConfig) -> Manifest:
    """Write rejected.jsonl, check that training samples are left and the reject fraction, then write
    manifest.json last."""
    rejects = list(plan.rejects)
    seen_lines = {(r["dataset"], r["line"]) for r in rejects}
    counts = {k: v.model_copy() for k, v in plan.counts.items()}
    splits = {"train": SplitInfo(), "eval": SplitInfo()}
    for res in sorted(results, key=lambda r: (r.split != "train", r.index)):
        for r in res.rejects:  # a repeated line is rejected once
            if (r["dataset"], r["line"]) not in seen_lines:
                seen_lines.add((r["dataset"], r["line"]))
                rejects.append(r)
        for di, n in res.written.items():
            c = counts[plan.datasets[di].name]
            setattr(c, res.split, getattr(c, res.split) + n)
        split = splits[res.split]
        split.shards += res.shards
    for split in splits.values():
        split.samples = sum(s.samples for s in split.shards)
        split.bytes = sum(s.bytes for s in split.shards)
    order = {s.name: i for i, s in enumerate(plan.datasets)}
    rejects.sort(key=lambda r: (order[r["dataset"]], r["line"], r["repeat"]))
    by_reason = dict(sorted(Counter(r["reason"] for r in rejects).items()))
    for r in rejects:
        counts[r["dataset"]].rejected += 1

    fs, root = fsspec.core.url_to_fs(data.shards)
    with fs.open(f"{root}/{REJECTED_NAME}", "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rejects)
    try:
        if not splits["train"].samples:
            _no_training_sample(counts, by_reason, splits["eval"].samples, data)
        check_reject_fraction(counts, by_reason, data)
    except PrepareError:  # without a manifest the shards are of no use: leave only rejected.jsonl
        _remove_stale_shards(fs, root, keep=set())
        raise
    manifest = Manifest(fingerprint=plan.fingerprint, train=splits["train"], eval=splits["eval"], datasets=counts,
                        rejected_by_reason=by_reason, settings=plan.settings, warnings=plan.warnings)
    text = manifest.model_dump_json(indent=2)
    if isinstance(fs, LocalFileSystem):  # write-then-rename: a manifest on disk is always whole
        tmp = f"{root}/{MANIFEST_NAME}.tmp-{uuid.uuid4().hex[:12]}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, f"{root}/{MANIFEST_NAME}")
    else:
        fs.pipe_file(f"{root}/{MANIFEST_NAME}", text.encode())
    _remove_stale_shards(fs, root, keep={s.name for s in manifest.train.shards + manifest.eval.shards})
    return manifest


def _no_training_sample(
    counts: dict[str, DatasetCounts], by_reason: dict[str, int], held: int, data: DataConfig
) -> NoReturn:
    selected = sum(c.selected for c in counts.values())
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(by_reason.items(), key=lambda kv: -kv[1])) or "none"
    raise PrepareError(
        f"no training sample left in data set(s) {', '.join(counts)}: {sum(by_reason.values())} of {selected} "
        f"records rejected ({reasons}), {held} held out for evaluation. Every rejected sample with its file, line "
        f"and reason is in {data.shards.rstrip('/')}/{REJECTED_NAME}; fix the inputs."
    )


def check_reject_fraction(counts: dict[str, DatasetCounts], by_reason: dict[str, int], data: DataConfig) -> None:
    """Fail when more than data.max_reject_fraction of the used records were rejected."""
    selected = sum(c.selected for c in counts.values())
    rejected = sum(by_reason.values())
    if selected and rejected / selected > data.max_reject_fraction:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(by_reason.items(), key=lambda kv: -kv[1]))
        raise PrepareError(
            f"{rejected} of {selected} samples rejected ({rejected / selected:.1%}), more than "
            f"data.max_reject_fraction={data.max_reject_fraction:.1%}: {reasons}. Every rejected sample with its "
            f"file, line and reason is in {data.shards.rstrip('/')}/{REJECTED_NAME}; fix the inputs or raise the limit."
        )


def _remove_stale_shards(fs, root: str, keep: set[str]) -> None:
    for path in fs.ls(root, detail=False):
        name = os.path.basename(path.rstrip("/"))
        if name.endswith(".tar") and name.startswith(("train-", "eval-")) and name not in keep:
            fs.rm(path)


@lru_cache(maxsize=4)
def _length_check(model_json: str, data_json: str) -> LengthCheck:
    """One tokenizer per worker process and config, shared by the groups it writes."""
    from vlm_core.data.length import make_length_check

    return make_length_check(ModelConfig.model_validate_json(model_json), DataConfig.model_validate_json(data_json))


def write_group_job(group: Group, datasets: list[DatasetSpec], data: DataConfig, model: ModelConfig | None
                    ) -> GroupResult:
    """`write_group` as a worker process runs it: the length check is built there, once per process."""
    check = _length_check(model.model_dump_json(), data.model_dump_json()) if model else None
    return write_group(group, datasets, data, check)


def write_group_in(pool: Executor, group: Group, datasets: list[DatasetSpec], data: DataConfig,
                   model: ModelConfig | None) -> GroupResult:
    """Write one group in one of the pool's processes (vlm_core.data.pool) and wait for it."""
    try:
        return pool.submit(write_group_job, group, datasets, data, model).result()
    except BrokenProcessPool as exc:
        raise _worker_died(group, exc) from exc


def _worker_died(group: Group, exc: BrokenProcessPool) -> RuntimeError:
    return RuntimeError(f"shard group {group.split}-{group.index:06d}: a worker process died ({exc}): killed from "
                        "outside or out of memory; rerun (groups already written are rewritten identically) or lower "
                        "data.prepare_workers")


def prepare_shards(
    data: DataConfig,
    workers: int = 1,
    model: ModelConfig | None = None,
    pool: Literal["processes", "threads"] | None = None,
) -> Manifest:
    """The whole prepare step without an orchestrator: groups written by `workers` processes (or
    threads: `pool`, default data.prepare_pool), or in this thread when workers is 1.

    With `model`, samples too long for data.max_seq_length under that model's tokenizer and tile
    geometry are rejected as too_long (and the model's tokenizer/config join the fingerprint).
    """
    from vlm_core.data.pool import process_pool

    if model is not None:  # the length check's imports (transformers) only when lengths are checked
        from vlm_core.data.length import model_fingerprint
    data_for_pool = data.model_copy(update={"prepare_pool": pool or data.prepare_pool})
    with process_pool(data_for_pool, workers, model) as procs:  # entered first: it starts while we plan
        plan = plan_shards(data, model_fingerprint(model) if model else "")
        if plan.up_to_date:
            return plan.manifest
        with FolderLock(data.shards, "shard preparation"):  # one writer per shard folder
            begin(data)
            if procs is not None:
                futures = [procs.submit(write_group_job, g, plan.datasets, data, model) for g in plan.groups]
                results = []
                for g, fut in zip(plan.groups, futures, strict=True):
                    try:
                        results.append(fut.result())
                    except BrokenProcessPool as exc:
                        raise _worker_died(g, exc) from exc
            else:
                check = _length_check(model.model_dump_json(), data.model_dump_json()) if model else None
                with ThreadPoolExecutor(max_workers=max(1, workers)) as threads:
                    results = list(threads.map(lambda g: write_group(g, plan.datasets, data, check), plan.groups))
            return finalize(plan, results, data)
