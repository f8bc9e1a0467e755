"""Lineage and the model card: what a published model was made of, and how to make it again.

A model folder answers "where did this come from?" without the run that made it: `lineage.json` holds
the data (meta JSON, shard fingerprint, sha256 of the shards' manifest.json), the full resolved config
and its hash, the base model's content hash, the run identity and its parent checkpoint, the package
version and git commit, the Prefect flow-run id, start and end times and the evaluation metrics.
`vlmft_config.yaml` is that config as a file, so rebuilding the exact shards and run is
`vlmft prepare --config vlmft_config.yaml` then `vlmft train --config vlmft_config.yaml` (from the
working directory recorded, where its relative paths resolve); the new manifest's fingerprint and the
new run's identity must equal the recorded ones. `README.md` is a Hugging Face model card: YAML front
matter (base_model, library_name, pipeline_tag, tags, model-index with the evaluation results per
data set) and a short body.

Prefect-free: the caller passes the flow-run id in.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import fsspec
import yaml

from vlm_core.config import FinetuneConfig, to_yaml
from vlm_core.data.manifest import MANIFEST_NAME, Manifest
from vlm_core.identity import RunIdentity, compute_identity, read_identity
from vlm_core.promote import LINEAGE_FILE

LINEAGE_VERSION = 1
CONFIG_FILE = "vlmft_config.yaml"
CARD_FILE = "README.md"
PACKAGE = "vlm-finetune"
METRIC_NAMES = {"exact_match": "Exact match", "f1": "Token F1", "anls": "ANLS"}


def package_version(package: str = PACKAGE) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(folder: str | Path | None = None) -> str | None:
    """The commit checked out where this package's code lives, or None: not a git checkout, no git, or
    a checkout of something else (a virtualenv inside another project's repository). Never raises."""
    package_dir = Path(folder) if folder else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package_dir, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or not re.fullmatch(r"[0-9a-f]{40}", lines[1]):
        return None
    top = Path(lines[0]).resolve()
    return lines[1] if package_dir.resolve().parent == top or package_dir.resolve() == top else None


def config_hash(cfg: FinetuneConfig) -> str:
    """sha256 of the full resolved config (every field, sorted keys): equal configs, equal hashes."""
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def read_manifest_bytes(shards: str) -> bytes | None:
    """The shards' manifest.json as stored (for its sha256), or None when the shards are not here."""
    fs, path = fsspec.core.url_to_fs(f"{shards.rstrip('/')}/{MANIFEST_NAME}")
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def _iso(when: datetime | str | None) -> str | None:
    return when.isoformat(timespec="seconds") if isinstance(when, datetime) else when


def build_lineage(cfg: FinetuneConfig, identity: RunIdentity | None = None, *, metrics: dict[str, Any] | None = None,
                  flow_run_id: str | None = None, started_at: datetime | str | None = None,
                  ended_at: datetime | str | None = None, model_url: str | None = None) -> dict[str, Any]:
    """Everything needed to tell where a model came from and to rebuild its shards and run.

    `identity` is the run's; when None it is computed from the shards' manifest and the base model
    (vlm_core.identity.compute_identity). `cfg` is the run's resolved config (train.output_dir as the run
    used it, see with_run_dir): the parent checkpoint comes from the identity, else from the run folder's
    run_identity.json, else from train.resume_from.
    """
    identity = identity or compute_identity(cfg)
    raw = read_manifest_bytes(cfg.data.shards)
    manifest = Manifest.model_validate_json(raw) if raw is not None else None
    recorded = read_identity(cfg.train.output_dir) or {}  # the run folder's record keeps the parent across resumes
    parent = identity.parent or (recorded.get("parent") if recorded.get("identity") == identity.id else None)
    if parent is None and cfg.train.resume_from not in ("auto", "none"):
        parent = {"checkpoint": cfg.train.resume_from, "identity": None}
    config = cfg.model_dump(mode="json")
    return {
        "schema_version": LINEAGE_VERSION,
        "name": cfg.name,
        "run_id": identity.run_id(cfg.name),
        "identity": identity.id,
        "parent": parent,
        "model_url": model_url,
        "data": {
            "meta": cfg.data.meta,
            "image_root": cfg.data.image_root,
            "shards": cfg.data.shards,
            "fingerprint": identity.data,
            "manifest_sha256": hashlib.sha256(raw).hexdigest() if raw is not None else None,
            "train_samples": manifest.train.samples if manifest else None,
            "eval_samples": manifest.eval.samples if manifest else None,
            "datasets": sorted(manifest.datasets) if manifest else None,
        },
        "base_model": {"path": cfg.model.path, "hash": identity.model},
        "config": config,
        "config_hash": config_hash(cfg),
        "working_dir": os.getcwd(),
        "software": {
            "package": PACKAGE,
            "version": package_version(),
            "git_commit": git_commit(),
            "python": platform.python_version(),
            "torch": package_version("torch"),
            "transformers": package_version("transformers"),
        },
        "flow_run_id": flow_run_id,
        "started_at": _iso(started_at),
        "ended_at": _iso(ended_at),
        "metrics": metrics,
        "rebuild": (f"from {os.getcwd()}: vlmft prepare --config {CONFIG_FILE} (data.meta={cfg.data.meta}; the new "
                    f"{MANIFEST_NAME} must have fingerprint {identity.data}), then vlmft train --config {CONFIG_FILE} "
                    f"(run identity {identity.id})"),
    }


def model_index(cfg: FinetuneConfig, metrics: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The model card's `model-index`: one result for all held-out samples and one per data set."""
    if not metrics:
        return []

    def result(name: str, kind: str, scores: dict[str, Any]) -> dict[str, Any]:
        return {
            "task": {"type": "image-text-to-text", "name": "Visual question answering"},
            "dataset": {"name": name, "type": kind, "split": "eval"},
            "metrics": [{"type": key, "value": scores[key], "name": METRIC_NAMES[key]}
                        for key in METRIC_NAMES if scores.get(key) is not None],
        }

    results = [result("all held-out samples", f"{cfg.name}-eval", metrics.get("overall") or {})]
    results += [result(name, name, scores) for name, scores in sorted((metrics.get("datasets") or {}).items())]
    return [{"name": cfg.name, "results": results}]


def _eval_table(metrics: dict[str, Any]) -> str:
    rows = [("all held-out samples", metrics.get("overall") or {})] + sorted((metrics.get("datasets") or {}).items())
    lines = ["| data set | samples | " + " | ".join(METRIC_NAMES.values()) + " |", "|---|---:|" + "---:|" * len(METRIC_NAMES)]
    for name, scores in rows:
        cells = [f"{scores[k]:.3f}" if isinstance(scores.get(k), int | float) else "–" for k in METRIC_NAMES]
        lines.append(f"| {name} | {scores.get('count', '–')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_card(cfg: FinetuneConfig, metrics: dict[str, Any] | None, lineage: dict[str, Any]) -> str:
    """The README.md text: Hugging Face front matter (PyYAML) and a short body."""
    front = {
        "base_model": cfg.model.path,
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["vlm-finetune", "internvl", "lora" if cfg.lora.enabled else "full-fine-tune"],
    }
    if index := model_index(cfg, metrics):
        front["model-index"] = index
    data, software = lineage.get("data") or {}, lineage.get("software") or {}
    how = (f"LoRA (r={cfg.lora.r}) merged into the base weights" if cfg.lora.enabled else "full fine-tuning")
    count = data.get("train_samples")
    trained_on = (f"{'' if count is None else f'{count} '}training samples from `{data.get('meta')}`"
                  + (f" (data sets: {', '.join(data['datasets'])})" if data.get("datasets") else ""))
    commit = software.get("git_commit")
    evaluation = (f"Generated answers to {(metrics.get('overall') or {}).get('count', '?')} held-out questions, "
                  f"scored after normalisation:\n\n{_eval_table(metrics)}" if metrics else "Not evaluated.")
    body = f"""# {cfg.name}

`{cfg.model.path}` fine-tuned with {how} by vlm-finetune {software.get('version') or ''}\
{f' (commit {commit[:12]})' if commit else ''}: run `{lineage.get('run_id')}`.

## Training data

{trained_on}; shard fingerprint `{data.get('fingerprint')}`, manifest.json sha256 `{data.get('manifest_sha256')}`.

## Evaluation

{evaluation}

## How to load

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("PATH_OF_THIS_FOLDER")
processor = AutoProcessor.from_pretrained("PATH_OF_THIS_FOLDER")
```

## Lineage

`{LINEAGE_FILE}` holds the full config (hash `{lineage.get('config_hash')}`), the data and base-model hashes, the
run identity `{lineage.get('identity')}` and its parent, and the software versions. To rebuild the shards and
the run: {lineage.get('rebuild')}.
"""
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + body


def write_model_card(folder: str | Path, cfg: FinetuneConfig, metrics: dict[str, Any] | None,
                     lineage: dict[str, Any]) -> Path:
    """Write README.md (the model card), lineage.json and vlmft_config.yaml into a model folder; return the card.

    Call it on the local model folder before it is uploaded (the upload then carries them)."""
    folder = Path(folder)
    (folder / LINEAGE_FILE).write_text(json.dumps({**lineage, "metrics": metrics}, indent=1) + "\n")
    (folder / CONFIG_FILE).write_text(to_yaml(cfg))
    card = folder / CARD_FILE
    card.write_text(model_card(cfg, metrics, lineage), encoding="utf-8")
    return card
