"""Which model is current: one small pointer document per run name, moved only by an evaluation.

Every fine-tuned model stays where it was published (`{storage.url}/runs/{name}-{identity[:8]}/merged`,
with its model card and `lineage.json`), promoted or not. What a deployment serves is named by one
JSON document, `{storage.url}/{name}/current.json`: the model's URL, its evaluation metrics, the metric
and value that decided, the run it came from, a lineage summary, when it was promoted and which model it
replaced. Rolling back is pointing it at the previous model again (`vlmft promote --model URL`).

The rule (`decide`): a candidate becomes current when its `eval.metric` is at least the current model's
plus `eval.promotion_margin`, both measured in the same evaluation on the same samples (the caller
evaluates the current model again rather than trusting the number stored with it: samples, metric code
and generation settings may have changed since). With no current model, the candidate is promoted.

The pointer is written last and atomically, so a crash anywhere before it (training, merge, upload,
evaluation) leaves the previous pointer valid, and a reader never sees a partial document:

* local folder: the body goes to a temporary file in the same folder, is flushed to disk, and is
  renamed over `current.json` with `os.replace`, which POSIX makes atomic within one file system;
* object stores (s3fs): the whole body is sent in one `pipe_file` call, which s3fs sends as a single
  PutObject for bodies under 2 x 50 MiB (never a multipart upload for this document of a few KB). S3
  stores an object only once its PUT has completely arrived and then replaces the old version at once:
  a GET returns either the whole old document or the whole new one (strong read-after-write
  consistency), never a mix or a prefix.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from vlm_core.config import ConfigError
from vlm_core.lock import flocked
from vlm_core.storage import CHECKSUMS, StorageError, explain_error, with_retries

POINTER = "current.json"
POINTER_VERSION = 1
LINEAGE_FILE = "lineage.json"
METRICS_FILE = "eval_metrics.json"  # {"overall": {...}, "datasets": {...}}: evaluation results beside a model
METRICS = ("exact_match", "f1", "anls")
MAX_POINTER_BYTES = 1 << 20  # far below s3fs's single-PUT limit: the pointer is never a multipart upload
POINTER_KEYS = ("schema_version", "name", "model", "metric", "metrics", "promoted_at", "previous")


class PointerError(StorageError):
    """`current.json` exists but is not a complete pointer document (corrupt, truncated or hand-edited)."""


class CurrentChanged(RuntimeError):
    """The pointer moved between a candidate's evaluation and its promotion: another run promoted meanwhile."""


_UNCHECKED = object()  # promote(compared_with=...) not given: a promotion by hand, whatever is current


@dataclass(frozen=True)
class Decision:
    """Whether the candidate becomes current, and why, in one sentence with both numbers."""

    promote: bool
    reason: str


def pointer_url(storage_url: str, name: str) -> str:
    """Where the current-model pointer of run name `name` lives: `{storage_url}/{name}/current.json`."""
    return f"{storage_url.rstrip('/')}/{name}/{POINTER}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def model_location(url: str) -> str:
    """A model location as the pointer stores it: URLs as given, local paths absolute (readers run elsewhere)."""
    return url.rstrip("/") if "://" in url else str(Path(url).resolve())


def metric_value(metrics: dict[str, Any], metric: str, where: str = "the candidate's metrics") -> float:
    """`metrics["overall"][metric]` as a float; a missing or non-numeric value is a ConfigError naming it."""
    overall = metrics.get("overall") if isinstance(metrics, dict) else None
    value = overall.get(metric) if isinstance(overall, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        have = sorted(k for k in (overall or {}) if k in METRICS)
        raise ConfigError(f"{where} have no number overall.{metric} (have: {', '.join(have) or 'none'}); "
                          f"set eval.metric to one of {', '.join(METRICS)} that the evaluation produced")
    return float(value)


def decide(candidate: dict[str, Any], current: dict[str, Any] | None, metric: str, margin: float) -> Decision:
    """Promote `candidate` (metrics of the new model) over `current` (metrics of the current model, from the
    same evaluation on the same samples; None when there is no current model)?

    The candidate wins when its `overall[metric]` is at least the current one's plus `margin` (a tie
    with margin 0 promotes: the newer model was trained on the newer data). Values that are equal up
    to float rounding count as equal (0.85 + 0.05 is 0.9000000000000001). A NaN never wins.
    """
    new = metric_value(candidate, metric)
    if current is None:
        if math.isnan(new):
            return Decision(False, f"{metric} is NaN: no model becomes current")
        return Decision(True, f"no current model: the candidate ({metric} {new:.3f}) becomes current")
    old = metric_value(current, metric, "the current model's metrics")
    needed = old + margin
    wins = new >= needed or math.isclose(new, needed, rel_tol=0.0, abs_tol=1e-9)
    sign = "≥" if wins else "<"
    outcome = "the candidate becomes current" if wins else "the current model stays"
    return Decision(wins, f"{metric} {new:.3f} {sign} current {old:.3f} + margin {margin:.3f}: {outcome}")


def check_model_folder(model_url: str) -> None:
    """Fail in one line unless `model_url` is a published model folder: a `config.json` there and, in an
    object store, the checksum manifest that marks a complete upload (vlm_core.storage)."""
    fs, root = fsspec.core.url_to_fs(model_url)
    root = root.rstrip("/")
    try:
        fs.invalidate_cache()
        has_config = fs.isfile(f"{root}/config.json")
        complete = isinstance(fs, LocalFileSystem) or fs.isfile(f"{root}/{CHECKSUMS}")
    except Exception as exc:  # noqa: BLE001 - explained
        raise explain_error(exc, model_url, "checking the model folder", key="--model") from exc
    if not has_config:
        raise ConfigError(f"{model_url} is not a model folder (no config.json there); pass the folder of a "
                          "published model, e.g. STORAGE/runs/NAME-IDENTITY/merged")
    if not complete:
        raise ConfigError(f"{model_url} has no {CHECKSUMS}: its upload is missing or incomplete; upload the "
                          "model folder again (vlmft merge) before making it current")


def _read_optional_json(url: str) -> Any | None:
    """The JSON document at `url`; None when there is none; a PointerError naming the URL when it is broken."""
    fs, path = fsspec.core.url_to_fs(url)

    def cat() -> bytes | None:
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None

    data = with_retries(cat, url, "reading")
    if data is None:
        return None
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PointerError(f"{url} is not valid JSON ({exc}; {len(data)} bytes): it is corrupt or was not written "
                           "by vlmft; fix it, or make a model current again with vlmft promote") from None


def read_current(storage_url: str, name: str) -> dict[str, Any] | None:
    """The current-model pointer of `name` in `storage_url`, or None when no model was ever promoted.

    A document that exists but is not a complete pointer raises PointerError naming its URL."""
    url = pointer_url(storage_url, name)
    doc = _read_optional_json(url)
    if doc is None:
        return None
    missing = [k for k in POINTER_KEYS if k not in doc] if isinstance(doc, dict) else list(POINTER_KEYS)
    if missing:
        raise PointerError(f"{url} is not a current-model pointer (missing: {', '.join(missing)}); fix it, or make "
                           "a model current again with vlmft promote")
    return doc


def read_model_lineage(model_url: str) -> dict[str, Any] | None:
    """The `lineage.json` a published model folder carries (vlm_core.lineage), or None when it has none."""
    return _read_optional_json(f"{model_url.rstrip('/')}/{LINEAGE_FILE}")


def read_model_metrics(model_url: str) -> dict[str, Any] | None:
    """A model folder's evaluation metrics: from its `lineage.json`, else its `eval_metrics.json`, else None."""
    lineage = read_model_lineage(model_url) or {}
    if lineage.get("metrics"):
        return lineage["metrics"]
    return _read_optional_json(f"{model_url.rstrip('/')}/{METRICS_FILE}")


def write_pointer(url: str, doc: dict[str, Any]) -> None:
    """Write the JSON document `doc` to `url` atomically (see the module docstring for why this is atomic)."""
    body = (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode()
    if len(body) > MAX_POINTER_BYTES:
        raise ValueError(f"pointer document of {len(body)} bytes: keep it under {MAX_POINTER_BYTES} (a single PUT)")
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        _replace_local(Path(path), body)
    else:
        with_retries(lambda: fs.pipe_file(path, body), url, "writing the current-model pointer")


def _replace_local(path: Path, body: bytes) -> None:
    """Temp file in the same folder, flushed to disk, renamed over `path`; the temp file never stays behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def lineage_summary(lineage: dict[str, Any] | None) -> dict[str, Any]:
    """The few lineage fields the pointer repeats so that `vlmft current` can say where a model came from;
    the whole record stays in the model folder's lineage.json."""
    lineage = lineage or {}
    data, base, software = lineage.get("data") or {}, lineage.get("base_model") or {}, lineage.get("software") or {}
    return {
        "run_id": lineage.get("run_id"),
        "identity": lineage.get("identity"),
        "parent": lineage.get("parent"),
        "data_meta": data.get("meta"),
        "data_fingerprint": data.get("fingerprint"),
        "manifest_sha256": data.get("manifest_sha256"),
        "config_hash": lineage.get("config_hash"),
        "base_model": base.get("path"),
        "base_model_hash": base.get("hash"),
        "version": software.get("version"),
        "git_commit": software.get("git_commit"),
        "flow_run_id": lineage.get("flow_run_id"),
        "ended_at": lineage.get("ended_at"),
    }


def promote(storage_url: str, name: str, model_url: str, metrics: dict[str, Any] | None, metric: str,
            lineage: dict[str, Any] | None = None, reason: str = "promoted by hand",
            compared_with: Any = _UNCHECKED) -> dict[str, Any]:
    """Make `model_url` the current model of `name`: write `{storage_url}/{name}/current.json` and return it.

    Call it only after the model folder is completely published (it is checked here) and the decision is
    made; nothing else is written, so a model not promoted simply stays where it was published. `metrics`
    may be None (a model promoted by hand that was never evaluated); `reason` is recorded as given
    (Decision.reason after an evaluation).

    compared_with: the current model's URL (None: there was none) that the evaluation compared the
    candidate with. If the pointer names another model now, another run was promoted while this one
    evaluated, and this candidate never beat it: CurrentChanged is raised and nothing is written (the
    last writer would otherwise win, however it scored). In a local folder the check and the write
    hold an exclusive lock, so two promotions are strictly one after the other; an object store offers
    no compare-and-swap through fsspec, so there the window left is one GET to one PUT (milliseconds),
    not an evaluation's minutes.
    """
    check_model_folder(model_url)
    model_url = model_location(model_url)
    with _pointer_lock(storage_url, name):
        before = read_current(storage_url, name)
        now = before["model"] if before else None
        if compared_with is not _UNCHECKED and now != compared_with:
            raise CurrentChanged(
                f"the current model of {name} changed while this candidate was evaluated: it was compared with "
                f"{compared_with or 'no current model'}, and the pointer now names {now}; not promoted (run the "
                "evaluation again to compare with the new current model)")
        return _promote_over(storage_url, name, model_url, metrics, metric, lineage, reason, before)


@contextmanager
def _pointer_lock(storage_url: str, name: str) -> Iterator[None]:
    """An exclusive lock on the pointer's folder while it is read and rewritten (local folders only)."""
    fs, path = fsspec.core.url_to_fs(pointer_url(storage_url, name))
    if not isinstance(fs, LocalFileSystem):
        yield
        return
    folder = Path(path).parent  # the folder itself is locked: no lock file beside the pointer
    folder.mkdir(parents=True, exist_ok=True)
    with flocked(folder):
        yield


def _promote_over(storage_url: str, name: str, model_url: str, metrics: dict[str, Any] | None, metric: str,
                  lineage: dict[str, Any] | None, reason: str, before: dict[str, Any] | None) -> dict[str, Any]:
    """Write the pointer document that replaces `before` (the pointer as read under the lock) and return it."""
    if before is None:
        previous = None
    elif before["model"] != model_url:
        previous = before["model"]
    else:  # made current again: keep what it had replaced
        previous = before.get("previous")
    value = metric_value(metrics, metric) if metrics else None
    lineage = lineage or {}
    doc = {
        "schema_version": POINTER_VERSION,
        "name": name,
        "model": model_url,
        "metric": {"name": metric, "value": value},
        "metrics": metrics,
        "reason": reason,
        "run_id": lineage.get("run_id"),
        "identity": lineage.get("identity"),
        "lineage": lineage_summary(lineage),
        "lineage_url": f"{model_url}/{LINEAGE_FILE}" if lineage else None,
        "promoted_at": _now(),
        "previous": previous,
    }
    write_pointer(pointer_url(storage_url, name), doc)
    return doc
