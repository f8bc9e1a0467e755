"""Folder sync to and from object storage (any fsspec URL; S3 through s3fs), safely.

An uploaded folder is complete only when its checksum manifest (`SHA256SUMS.json`: every file's
size and sha256) has been written, and that file is always written last. A reader that finds no
manifest knows the upload is partial; a download checks every file against it. Uploads skip files
whose checksum already matches the manifest in storage, run in parallel, and retry transient
errors with exponential backoff. Credentials and the S3 endpoint come from the environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...), never from the config, and no
error message here ever includes them: errors name the URL and what to check.

Written by hand on top of fsspec rather than with `fs.put(recursive=True)` because that has no
completion marker, no checksum skip and no per-file retry.

Before any work starts, `check_scheme`, `check_bucket` and `probe_writable` tell in one line
whether a URL setting can be used at all: a known scheme, an existing bucket (never created
implicitly: a typo in a bucket name must not become a new bucket) and, for storage.url, write
access proven by writing and deleting a small object.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from vlm_core.config import ConfigError
from vlm_core.lock import FolderLock, is_lock_file

CHECKSUMS = "SHA256SUMS.json"
BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss"})  # object stores with buckets


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URL and the likely cause, never a secret."""


class TransientStorageError(StorageError):
    """The storage could not be reached or failed on its side, even after retries: worth trying later.
    (A missing bucket or path, denied access or a corrupt copy is a plain StorageError: it stays.)"""


@dataclass
class SyncReport:
    """What a sync did: files and bytes sent (or fetched) and files skipped as unchanged."""

    url: str
    files_sent: int = 0
    bytes_sent: int = 0
    files_skipped: int = 0
    files: dict[str, dict] = field(default_factory=dict)


def sha256_file(path: Path, chunk: int = 4 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _local_files(folder: Path) -> list[str]:
    """Relative posix paths of every file under `folder` except the manifest and lock files, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() != CHECKSUMS and not is_lock_file(p.name))


def local_checksums(folder: Path) -> dict[str, dict]:
    """{relative posix path: {size, sha256}} for every file under `folder` (sorted, deterministic)."""
    return {rel: {"size": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)}
            for rel in _local_files(folder)}


def _fs(url: str):
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def explain_error(exc: BaseException, url: str, action: str, key: str = "storage.url") -> StorageError:
    """Turn a client error into a one-line message that names the URL and the fix (and no credential)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text:
        hint = f"the bucket or path does not exist; create the bucket or fix {key}"
    elif isinstance(exc, PermissionError) or any(k in text for k in ("AccessDenied", "InvalidAccessKeyId",
                                                                     "SignatureDoesNotMatch", "Forbidden")):
        hint = "access denied; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the Prefect Secret block)"
    elif any(k in text for k in ("Connect", "connect", "Endpoint", "Timeout", "timed out", "Max retries")):
        hint = "the storage endpoint cannot be reached; check AWS_ENDPOINT_URL and the network"
    else:
        hint = "see the cause above"
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if secret and secret in text:  # belt and braces: never echo a secret
        text = text.replace(secret, "***")
    error = StorageError if _is_permanent(exc) else TransientStorageError
    return error(f"{action} {url} failed: {hint} ({text[:300]})")


def _is_permanent(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError) or any(
        k in text for k in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")
    )


def with_retries(fn: Callable[[], object], url: str, action: str, retries: int = 4, base_delay: float = 0.5):
    """Run fn, retrying transient errors with exponential backoff and jitter; raise StorageError.

    A hand-written loop: no retry library (tenacity, backoff, stamina) is installed, not even through
    Prefect 3.9, and adding one for these eight lines would not make them simpler.
    """
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if _is_permanent(exc) or attempt == retries:
                raise explain_error(exc, url, action) from exc
            time.sleep(base_delay * 2**attempt * (0.5 + random.random()))
    raise AssertionError("unreachable")


def read_remote_checksums(url: str) -> dict[str, dict] | None:
    """The checksum manifest of an uploaded folder, or None when the upload is missing or partial."""
    fs, root = _fs(url)
    try:
        data = fs.cat_file(f"{root}/{CHECKSUMS}")
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001
        raise explain_error(exc, url, "reading the checksum manifest of") from exc
    return json.loads(data)["files"]


def is_complete(url: str) -> bool:
    return read_remote_checksums(url) is not None


def upload_folder(local: str | Path, url: str, workers: int = 8, retries: int = 4) -> SyncReport:
    """Upload `local` to `url`; unchanged files are skipped; the checksum manifest is written last.

    Each worker hashes its file and uploads it at once when it differs from the stored manifest, so
    hashing overlaps the network instead of preceding it (hashing a multi-GB checkpoint first would
    delay the first byte by seconds; hashlib releases the GIL, so threads hash in parallel too).
    One upload per destination at a time (vlm_core.lock): a second one raises LockHeld.
    """
    local = Path(local)
    if not local.is_dir():
        raise StorageError(f"cannot upload {local}: not a folder")
    with FolderLock(url, "upload"):
        return _upload(local, url, workers, retries)


def _upload(local: Path, url: str, workers: int, retries: int) -> SyncReport:
    fs, root = _fs(url)
    rels = _local_files(local)
    remote = with_retries(lambda: read_remote_checksums(url), url, "checking", retries) or {}
    files: dict[str, dict] = {}
    unmark = threading.Lock()
    unmarked = [not remote]  # nothing to unmark when no manifest is there

    def send(rel: str) -> int | None:
        path = local / rel
        info = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        files[rel] = info
        if remote.get(rel) == info:
            return None
        with unmark:  # the folder is about to change: it is not complete until the new manifest lands
            if not unmarked[0]:
                with_retries(lambda: fs.rm_file(f"{root}/{CHECKSUMS}"), url, "unmarking", retries)
                unmarked[0] = True
        _put(fs, root, path, rel, url, retries)
        return info["size"]

    report = SyncReport(url)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for size in pool.map(send, rels):
            if size is None:
                report.files_skipped += 1
            else:
                report.files_sent += 1
                report.bytes_sent += size
    report.files = {rel: files[rel] for rel in rels}
    if report.files_sent == 0 and remote.keys() == report.files.keys():
        return report
    if not unmarked[0]:  # only deletions: unmark before the manifest changes too
        with_retries(lambda: fs.rm_file(f"{root}/{CHECKSUMS}"), url, "unmarking", retries)
    write_checksums(url, report.files, retries)
    return report


def _put(fs, root: str, path: Path, rel: str, url: str, retries: int) -> None:
    """One file up to `{root}/{rel}`; a local "bucket" needs its folders made (object stores have none)."""
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(f"{root}/{rel}"), exist_ok=True)
    with_retries(lambda: fs.put_file(str(path), f"{root}/{rel}"), f"{url}/{rel}", "uploading to", retries)


def put_files(local: str | Path, rels: list[str], url: str, workers: int = 8, retries: int = 4) -> dict[str, dict]:
    """Upload some files of `local` into `url` (no manifest, no lock: several writers share one prefix,
    each with its own files; vlm_core.rank_checkpoints); returns their {rel: {size, sha256}}."""
    local = Path(local)
    fs, root = _fs(url)

    def send(rel: str) -> tuple[str, dict]:
        path = local / rel
        info = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        _put(fs, root, path, rel, url, retries)
        return rel, info

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return dict(sorted(pool.map(send, rels)))


def write_checksums(url: str, files: dict[str, dict], retries: int = 4) -> None:
    """Mark the folder at `url` complete with the manifest of `files` (already uploaded by put_files)."""
    fs, root = _fs(url)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(root, exist_ok=True)
    manifest = json.dumps({"files": dict(sorted(files.items()))}, indent=1, sort_keys=True).encode()
    with_retries(lambda: fs.pipe_file(f"{root}/{CHECKSUMS}", manifest), url, "marking complete", retries)


def download_folder(url: str, local: str | Path, workers: int = 8, retries: int = 4,
                    select: Callable[[str], bool] | None = None) -> SyncReport:
    """Download a complete upload from `url` into `local`, verifying every file's sha256; with `select`,
    only the files whose relative path it accepts."""
    local = Path(local)
    fs, root = _fs(url)
    files = with_retries(lambda: read_remote_checksums(url), url, "checking", retries)
    if files is None:
        raise StorageError(f"{url} has no {CHECKSUMS}: the upload is missing or incomplete")
    if select is not None:
        files = {rel: info for rel, info in files.items() if select(rel)}
    report = SyncReport(url, files=files)
    todo = []
    for rel, info in files.items():
        dest = local / rel
        if dest.is_file() and dest.stat().st_size == info["size"] and sha256_file(dest) == info["sha256"]:
            report.files_skipped += 1
        else:
            todo.append(rel)

    def fetch(rel: str) -> int:
        dest = local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        with_retries(lambda: fs.get_file(f"{root}/{rel}", str(tmp)), f"{url}/{rel}", "downloading", retries)
        if sha256_file(tmp) != files[rel]["sha256"]:
            tmp.unlink()
            raise StorageError(f"{url}/{rel}: checksum mismatch after download; the stored copy is corrupt")
        os.replace(tmp, dest)
        return files[rel]["size"]

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for size in pool.map(fetch, todo):
            report.files_sent += 1
            report.bytes_sent += size
    return report


def list_folders(url: str) -> list[str]:
    """Names of the entries directly under `url`, sorted; [] when it does not exist."""
    fs, root = _fs(url)
    fs.invalidate_cache()
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    except Exception as exc:  # noqa: BLE001
        raise explain_error(exc, url, "listing") from exc
    return sorted(os.path.basename(e.rstrip("/")) for e in entries)


def list_complete(url: str, prefix: str = "") -> list[str]:
    """Names of the sub-folders of `url` (starting with `prefix`) whose upload is complete."""
    fs, root = _fs(url)
    return [n for n in list_folders(url) if n.startswith(prefix) and fs.exists(f"{root}/{n}/{CHECKSUMS}")]


def check_scheme(key: str, url: str) -> None:
    """Fail in one line when the setting `key`'s URL scheme has no filesystem here (unknown, or its
    package is not installed); a plain path passes."""
    protocol, _ = fsspec.core.split_protocol(url)
    if protocol is None:
        return
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ConfigError(f"{key}={url}: unknown URL scheme '{protocol}://'; use a local path or an fsspec URL "
                          "such as s3://bucket/prefix") from None
    except ImportError as exc:
        raise ConfigError(f"{key}={url}: the {protocol}:// scheme needs a package that is not installed ({exc})") from None


def check_bucket(key: str, url: str) -> None:
    """Fail when the bucket of an object-store URL does not exist (a bucket is never created implicitly);
    other URLs and plain paths pass."""
    protocol, _ = fsspec.core.split_protocol(url)
    if protocol not in BUCKET_PROTOCOLS:
        return
    fs, root = _fs(url)
    bucket = root.split("/", 1)[0]
    if not bucket:
        raise ConfigError(f"{key}={url}: the URL names no bucket; use {protocol}://BUCKET/prefix")
    try:
        fs.info(bucket)
    except FileNotFoundError:
        raise StorageError(f"{key}={url}: bucket '{bucket}' does not exist, and it is never created implicitly; "
                           f"create it first or fix {key}") from None
    except Exception as exc:  # noqa: BLE001 - explained
        raise explain_error(exc, url, f"{key}: checking the bucket of", key) from exc


def probe_writable(key: str, url: str) -> None:
    """Prove that `url` (an object store or other remote folder) takes writes: its bucket exists, and a
    small object written under it can be deleted again. Not retried: a failing probe fails the step."""
    check_bucket(key, url)
    fs, root = _fs(url)
    probe = f"{root}/.vlmft-write-probe-{uuid.uuid4().hex[:12]}"
    with_retries(lambda: fs.pipe_file(probe, b"probe"), url, f"{key}: writing a test object to", retries=0)
    with_retries(lambda: fs.rm_file(probe), url, f"{key}: deleting the test object from", retries=0)
