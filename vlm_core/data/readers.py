"""Read InternVL meta JSON + JSONL annotations, or a single LLaVA JSON list, line by line.

InternVL's meta JSON maps dataset names to `{root, annotation, repeat_time, max_dynamic_patch}`.
Relative `root` / `annotation` paths resolve against the meta file's own folder (so a data set
folder can move, or live in S3, as one piece). Every file is read through fsspec, so local paths and
`s3://` URLs work alike. A JSONL line that is not UTF-8 or not JSON is not an error of the whole run:
it comes back as a `RawRecord` with a reject reason, and ends up in rejected.jsonl.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass

import fsspec

from vlm_core.config import ConfigError


@dataclass(frozen=True)
class DatasetSpec:
    """One input data set."""

    name: str
    root: str
    annotation: str
    repeat_time: float
    max_dynamic_patch: int | None


@dataclass
class RawRecord:
    """One annotation line (JSONL) or list element (LLaVA JSON): parsed, or why it could not be."""

    line: int
    record: object | None
    reason: str | None = None
    detail: str | None = None


def _is_url(path: str) -> bool:
    return "://" in path


def resolve(base_dir: str, path: str) -> str:
    """`path` as written, made absolute against `base_dir` (a folder path or URL) when relative."""
    if _is_url(path) or posixpath.isabs(path):
        return path
    proto, sep, rest = base_dir.rpartition("://")
    joined = posixpath.normpath(posixpath.join(rest or ".", path))
    return f"{proto}{sep}{joined}" if sep else joined


def read_bytes(url: str) -> bytes:
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{url} does not exist") from None


def read_meta(meta: str, image_root: str | None) -> list[DatasetSpec]:
    """Data sets named by `data.meta`: an InternVL meta JSON (object) or one LLaVA JSON list."""
    text = read_bytes(meta)
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"data.meta={meta}: not valid JSON ({exc})") from None
    base = posixpath.dirname(meta) if not meta.endswith("/") else meta
    if isinstance(obj, list):
        if image_root is None:
            raise ConfigError(f"data.meta={meta} is a LLaVA JSON list; set data.image_root to its image folder")
        name = posixpath.splitext(posixpath.basename(meta))[0]
        return [DatasetSpec(name, resolve(base, image_root), meta, 1.0, None)]
    if not isinstance(obj, dict) or not obj:
        raise ConfigError(f"data.meta={meta}: expected an object of data sets or a LLaVA JSON list")
    specs = []
    for name, entry in obj.items():
        where = f"data.meta={meta}, data set {name!r}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected an object with root and annotation")
        missing = [k for k in ("root", "annotation") if not isinstance(entry.get(k), str)]
        if missing:
            raise ConfigError(f"{where}: missing or non-string field(s) {', '.join(missing)}")
        repeat = entry.get("repeat_time", 1)
        if not isinstance(repeat, int | float) or repeat <= 0:
            raise ConfigError(f"{where}: repeat_time must be a positive number, got {repeat!r}")
        if repeat > 1 and repeat != int(repeat):
            raise ConfigError(f"{where}: repeat_time above 1 must be a whole number, got {repeat}")
        patch = entry.get("max_dynamic_patch")
        if patch is not None and (not isinstance(patch, int) or patch < 1):
            raise ConfigError(f"{where}: max_dynamic_patch must be a positive integer, got {patch!r}")
        specs.append(DatasetSpec(name, resolve(base, entry["root"]), resolve(base, entry["annotation"]),
                                 float(repeat), patch))
    return specs


def read_records(spec: DatasetSpec, data: bytes) -> list[RawRecord]:
    """Parse the annotation file's bytes: JSONL (one record a line; blank lines skipped) or a JSON list."""
    if spec.annotation.endswith(".json"):
        try:
            items = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{spec.annotation}: not valid JSON ({exc})") from None
        if not isinstance(items, list):
            raise ConfigError(f"{spec.annotation}: a .json annotation file must hold a list of records")
        return [RawRecord(i + 1, item) for i, item in enumerate(items)]
    records = []
    for i, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            records.append(RawRecord(i, None, "not_utf8", f"bytes {exc.start}-{exc.end}: {exc.reason}"))
            continue
        try:
            records.append(RawRecord(i, json.loads(text)))
        except json.JSONDecodeError as exc:
            records.append(RawRecord(i, None, "invalid_json", f"column {exc.colno}: {exc.msg}"))
    return records


def repeat_selection(n: int, repeat_time: float) -> tuple[int, int]:
    """(records used, copies of each): repeat_time < 1 keeps the first floor(n * r) records."""
    if repeat_time < 1:
        return math.floor(n * repeat_time), 1
    return n, int(repeat_time)
