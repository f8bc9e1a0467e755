"""Read InternVL meta JSON + JSONL annotations, or a single LLaVA JSON list, line by line.

InternVL's meta JSON maps dataset names to `{root, annotation, repeat_time, max_dynamic_patch}`
(plus `data_augment` and `length`, which InternVL writes and this project accepts and does not
use). Relative `root` / `annotation` paths resolve against the meta file's own folder (so a data set
folder can move, or live in S3, as one piece). Every file is read through fsspec, so local paths and
`s3://` URLs work alike.

The meta JSON is checked as a whole before any annotation is read: every key known (a typo such as
`repeat_times` would otherwise silently train on the default), every value of the right type,
`repeat_time` a finite number, and no data set name twice (JSON keeps the last of two equal keys,
which silently drops the first data set). An annotation file is checked as a whole too: an empty
file, a folder, or a file in another encoding than UTF-8 (UTF-16 and UTF-32, gzip) is one message
about the file. A UTF-8 byte order mark is accepted, and so are CR-only (classic Mac) line endings.

A JSONL line that is not UTF-8 or not JSON is not an error of the whole run: it comes back as a
`RawRecord` with a reject reason, and ends up in rejected.jsonl.
"""

from __future__ import annotations

import difflib
import json
import math
import posixpath
from dataclasses import dataclass

import fsspec

from vlm_core.config import ConfigError

REASONS = ("invalid_json", "not_utf8")  # reject reasons of single annotation lines

# Keys of one data set in the meta JSON: ours, then InternVL's own that are accepted and not used.
META_KEYS = ("root", "annotation", "repeat_time", "max_dynamic_patch")
INTERNVL_META_KEYS = ("data_augment", "length")

# The most training samples (records × repeat_time, all data sets together) one preparation writes.
# Every repeat is a stored copy (its images included) and a planned sample held in memory, so a
# mistyped repeat_time (1e9) would otherwise fill the memory and the disk before anything fails.
MAX_SAMPLES = 10_000_000

UTF8_BOM = b"\xef\xbb\xbf"
_BOMS = (  # longest first: the UTF-32-LE mark starts with the UTF-16-LE one
    (b"\x00\x00\xfe\xff", "UTF-32-BE"),
    (b"\xff\xfe\x00\x00", "UTF-32-LE"),
    (b"\xfe\xff", "UTF-16-BE"),
    (b"\xff\xfe", "UTF-16-LE"),
)


@dataclass(frozen=True)
class DatasetSpec:
    """One input data set."""

    name: str
    root: str
    annotation: str
    repeat_time: float
    max_dynamic_patch: int | None
    data_augment: bool = False  # InternVL's flag; read so a note can say it is not used


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


def read_bytes(url: str, what: str = "", expected: str = "a file") -> bytes:
    """The whole file at `url`; `what` names it in errors (e.g. "data.meta=..."), `expected` says
    what it should be when it is a folder."""
    label = what or url
    folder = f"{label} is a folder; it must name {expected}"
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except IsADirectoryError:
        raise ConfigError(folder) from None
    except FileNotFoundError:
        if fs.isdir(path):  # object stores report a prefix as missing, not as a folder
            raise ConfigError(folder) from None
        raise ConfigError(f"{label} does not exist") from None
    except PermissionError:
        raise ConfigError(f"{label} cannot be read (permission denied)") from None


class _Object(dict):
    """A JSON object that remembers the keys it held twice (json keeps only the last value)."""

    duplicates: list[str]


def _object(pairs: list[tuple[str, object]]) -> _Object:
    obj = _Object()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _shown(value: object) -> str:
    """A value as the user wrote it in JSON (true, NaN, "2"), for messages."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_keys(entry: dict, where: str) -> None:
    known = META_KEYS + INTERNVL_META_KEYS
    for key in entry:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}; {hint}a data set takes {', '.join(known)}")


def _spec(meta: str, base: str, name: str, entry: object) -> DatasetSpec:
    where = f"data.meta={meta}, data set {name!r}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected an object {{root, annotation, ...}}, got {type(entry).__name__}")
    if isinstance(entry, _Object) and entry.duplicates:
        raise ConfigError(f"{where}: key {entry.duplicates[0]!r} appears twice; JSON keeps only the last one: "
                          "remove one")
    missing = [k for k in ("root", "annotation") if not isinstance(entry.get(k), str)]
    if missing:
        raise ConfigError(f"{where}: missing or non-string field(s) {', '.join(missing)}")
    empty = [k for k in ("root", "annotation") if not entry[k].strip()]
    if empty:
        raise ConfigError(f"{where}: field(s) {', '.join(empty)} must not be empty")
    _check_keys(entry, where)
    repeat = entry.get("repeat_time", 1)
    if not _is_number(repeat) or not math.isfinite(repeat) or repeat <= 0:
        raise ConfigError(f"{where}: repeat_time must be a finite number > 0 (e.g. 2, or 0.5 for half the "
                          f"records), got {_shown(repeat)}")
    if repeat > 1 and repeat != int(repeat):
        raise ConfigError(f"{where}: repeat_time above 1 must be a whole number, got {repeat}")
    if repeat > MAX_SAMPLES:
        raise ConfigError(f"{where}: repeat_time={repeat:g} makes more than {MAX_SAMPLES:,} training samples "
                          "from a single record (each repeat is a stored copy); lower it")
    patch = entry.get("max_dynamic_patch")
    if patch is not None and (not _is_number(patch) or not isinstance(patch, int) or patch < 1):
        raise ConfigError(f"{where}: max_dynamic_patch must be an integer >= 1, got {_shown(patch)}")
    augment = entry.get("data_augment", False)
    if not isinstance(augment, bool):
        raise ConfigError(f"{where}: data_augment must be true or false, got {_shown(augment)}")
    length = entry.get("length")
    if length is not None and (not _is_number(length) or not isinstance(length, int) or length < 0):
        raise ConfigError(f"{where}: length must be an integer >= 0 (InternVL's record count), got "
                          f"{_shown(length)}")
    return DatasetSpec(name, resolve(base, entry["root"]), resolve(base, entry["annotation"]), float(repeat),
                       patch, augment)


def read_meta(meta: str, image_root: str | None) -> list[DatasetSpec]:
    """Data sets named by `data.meta`: an InternVL meta JSON (object) or one LLaVA JSON list."""
    text = read_bytes(meta, f"data.meta={meta}", "the meta JSON file (or a LLaVA JSON list)")
    try:
        obj = json.loads(text, object_pairs_hook=_object)  # bytes: a BOM, UTF-16 and UTF-32 are read too
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"data.meta={meta}: not valid JSON ({exc})") from None
    base = posixpath.dirname(meta) if not meta.endswith("/") else meta
    if isinstance(obj, list):
        if image_root is None:
            raise ConfigError(f"data.meta={meta} is a LLaVA JSON list; set data.image_root to its image folder")
        name = posixpath.splitext(posixpath.basename(meta))[0]
        return [DatasetSpec(name, resolve(base, image_root), meta, 1.0, None)]
    shapes = ("an InternVL meta JSON (an object of data sets: {name: {root, annotation, ...}}) or a LLaVA JSON "
              "list ([{id, image, conversations}, ...], with data.image_root)")
    if not isinstance(obj, dict) or not obj:
        got = _shown(obj) if not obj else f"a JSON {type(obj).__name__}"
        raise ConfigError(f"data.meta={meta}: expected {shapes}, got {got}")
    if obj.duplicates:
        raise ConfigError(f"data.meta={meta}: data set {obj.duplicates[0]!r} appears twice; JSON keeps only the "
                          "last one, so the first would be silently dropped: rename one")
    not_objects = [k for k, v in obj.items() if not isinstance(v, dict)]
    if not_objects and (len(not_objects) == len(obj) or "conversations" in obj):
        record = " (it looks like one LLaVA record)" if "conversations" in obj else ""
        raise ConfigError(f"data.meta={meta} holds a JSON object whose values are not data sets{record}; expected "
                          f"{shapes}")
    return [_spec(meta, base, name, entry) for name, entry in obj.items()]


def foreign_encoding(data: bytes) -> str | None:
    """The name of the encoding (or compression) of an annotation file that is plainly not UTF-8, or None.

    A byte order mark names UTF-16/32. Without one, JSON text is mostly ASCII, which UTF-16 writes as
    a NUL byte next to each character: NULs in most even or odd positions of the first 4 KiB give it
    away (UTF-8 JSON cannot hold a raw NUL at all).
    """
    for bom, name in _BOMS:
        if data.startswith(bom):
            return f"{name} (it starts with the byte order mark {bom.hex(' ').upper()})"
    if data.startswith(b"\x1f\x8b"):
        return "gzip-compressed"
    head = data[:4096]
    if len(head) < 4 or b"\x00" not in head:
        return None
    even, odd = head[0::2].count(0) / len(head[0::2]), head[1::2].count(0) / len(head[1::2])
    if even > 0.25 and odd > 0.25:
        return "UTF-32 (no byte order mark)"
    if odd > 0.25:
        return "UTF-16-LE (no byte order mark)"
    if even > 0.25:
        return "UTF-16-BE (no byte order mark)"
    return None


def read_records(spec: DatasetSpec, data: bytes) -> list[RawRecord]:
    """Parse the annotation file's bytes: JSONL (one record a line; blank lines skipped) or a JSON list."""
    where = f"data set {spec.name!r}: annotation {spec.annotation}"
    if spec.annotation.endswith(".json"):
        try:
            items = json.loads(data)  # bytes: a BOM, UTF-16 and UTF-32 are read too
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(items, list):
            raise ConfigError(f"{where}: a .json annotation file must hold a list of records [{{...}}, ...], got "
                              f"a JSON {type(items).__name__}")
        return [RawRecord(i + 1, item) for i, item in enumerate(items)]
    encoding = foreign_encoding(data)
    if encoding:
        name = posixpath.basename(spec.annotation)
        source = encoding.split()[0].replace("-LE", "LE").replace("-BE", "BE")
        fix = ("decompress it" if encoding.startswith("gzip") else
               f"convert it, e.g. iconv -f {source} -t UTF-8 {name} > {posixpath.splitext(name)[0]}.utf8.jsonl")
        raise ConfigError(f"{where} is {encoding}; JSONL annotations must be UTF-8 text: {fix}")
    if data.lstrip(UTF8_BOM + b" \t\r\n").startswith(b"["):
        try:
            whole = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            whole = None
        if isinstance(whole, list):
            raise ConfigError(f"{where} holds one JSON list, not JSON lines: name it .json, or write one record "
                              "per line")
    records = []
    # splitlines: LF, CRLF and CR-only endings alike (JSON text holds no raw CR or LF inside a value)
    for i, raw in enumerate(data.splitlines(), start=1):
        if raw.startswith(UTF8_BOM):  # the file's first line, or a file appended to another
            raw = raw[len(UTF8_BOM):]
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
