"""Pre-flight: a step's inputs and outputs checked before anything is written or any process starts.

Why: a mistake found late costs everything done before it, and sometimes leaves damage. Storage
that does not exist was reported only after training had finished; `data.shards` in a missing
bucket created that bucket; a model folder that is not InternVL, an output folder that is a file
or read-only, or an unknown URL scheme surfaced as tracebacks from deep inside the work. Each step
(prepare, train, run, merge) calls `preflight` first; every failure is one ConfigError or
StorageError line that names the setting and the fix.

Nothing here leaves a trace: folders are probed with a temporary folder that is removed at once,
storage with a small object that is deleted at once, and no folder or bucket is created.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

from vlm_core.config import ConfigError, FinetuneConfig
from vlm_core.hf_processor import check_publishable
from vlm_core.launch import check_launch, check_run
from vlm_core.model.load import check_model_source
from vlm_core.storage import check_bucket, check_scheme, probe_writable

Step = Literal["prepare", "train", "run", "merge"]

URL_SETTINGS: dict[Step, tuple[str, ...]] = {
    "prepare": ("data.meta", "data.image_root", "data.shards", "model.path"),
    "train": ("data.shards", "model.path", "storage.url", "train.resume_from"),
    "run": ("data.meta", "data.image_root", "data.shards", "model.path", "storage.url", "train.resume_from"),
    "merge": ("model.path", "storage.url"),
}


def _setting(cfg: FinetuneConfig, key: str) -> str | None:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def check_local_folder(key: str, path: str) -> None:
    """`path` is a folder this process can write in, or one it can create: probed by creating and
    removing a temporary folder in it (or in its nearest existing parent); nothing is left behind."""
    folder = Path(path.removeprefix("file://")).expanduser()
    existing = folder
    try:
        while not existing.exists():
            existing = existing.parent
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{key}={path} is a file, not a folder; point {key} at a folder")
        if not existing.is_dir():
            raise ConfigError(f"{key}={path}: {existing} is a file, so no folder can be made under it; fix {key}")
        os.rmdir(tempfile.mkdtemp(prefix=".vlmft-probe-", dir=existing))
    except OSError as exc:
        raise ConfigError(f"{key}={path}: cannot write in {existing} ({exc.strerror or exc}); "
                          f"point {key} at a folder you can write to") from None


def _check_storage(cfg: FinetuneConfig, write: bool) -> None:
    url = cfg.storage.url
    if not url:
        return
    if _is_local(url):
        check_local_folder("storage.url", url)
    elif write:
        probe_writable("storage.url", url)
    else:
        check_bucket("storage.url", url)


def preflight(cfg: FinetuneConfig, step: Step) -> None:
    """Everything about `step` that can be checked before it writes or starts anything.

    prepare: URL schemes, buckets of the data settings, data.shards writable, the model's config.json.
    train: the same for what training reads, the launch settings and the shard manifest (check_run),
    train.output_dir writable, storage.url reachable (writable when checkpoints are uploaded).
    run: prepare's checks and train's, except the manifest (prepare writes it); storage writable; the
    data settings expressible in a published processor (the run ends by publishing).
    merge: URL schemes, the model's config.json, storage.url writable (the merged model goes there),
    the data settings expressible in a published processor (vlm_core.hf_processor.check_publishable).
    Storage credentials must be in the environment already (tasks.storage.load_storage_credentials).
    """
    for key in URL_SETTINGS[step]:
        value = _setting(cfg, key)
        if value and not (key == "train.resume_from" and value in ("auto", "none")):
            check_scheme(key, value)
    if step in ("prepare", "run"):
        for key in ("data.meta", "data.image_root"):
            if value := _setting(cfg, key):
                check_bucket(key, value)
        check_bucket("data.shards", cfg.data.shards)
        if _is_local(cfg.data.shards):
            check_local_folder("data.shards", cfg.data.shards)
    if step == "prepare" or step == "merge":
        check_model_source(cfg.model)
    elif step == "run":
        check_launch(cfg)
    else:
        check_bucket("data.shards", cfg.data.shards)
        check_run(cfg)
    if step in ("train", "run"):
        check_local_folder("train.output_dir", cfg.train.output_dir)
    if step in ("run", "merge"):
        check_publishable(cfg.data)
    if step != "prepare":
        _check_storage(cfg, write=step != "train" or cfg.storage.upload_checkpoints)
