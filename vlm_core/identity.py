"""Run identity: one hash of everything that decides what a run learns.

A run folder, its checkpoints and its place in storage must never be continued by a run with other
settings: resuming the old run's newest checkpoint under a changed learning rate trains nothing new
and publishes the old model as if it were the new one. So a run is identified by the hash of

* every config setting that changes the result (the settings below that are not in
  `NOT_IN_IDENTITY`: those only name, place, log or launch the run, or act after training),
* the data fingerprint of the prepared shards (the manifest's hash of the inputs and shaping
  settings), and
* a content hash of the base model's files.

`run_identity.json` in the run folder records it with the settings it was made of, so a refusal can
name the fields that differ; every checkpoint's completion marker, `run_summary.json` and the storage
prefix (`runs/{name}-{identity[:8]}`) carry it too. Continuing from a checkpoint of another identity
is allowed only on purpose (`train.resume_from=PATH`), and is then recorded as the run's parent.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlm_core.config import ConfigError, FinetuneConfig

IDENTITY_FILE = "run_identity.json"

# Settings that do not change what a run learns, with the reason. Everything else is in the identity.
NOT_IN_IDENTITY: dict[str, str] = {
    "name": "names the run; its storage prefix carries the identity anyway",
    "data.meta": "the data fingerprint covers the annotations and images it points at",
    "data.image_root": "the data fingerprint covers the images",
    "data.write_demo_if_missing": "how missing demo data is made; the data fingerprint covers what was read",
    "data.shards": "where the shards are, not what they hold (the data fingerprint)",
    "data.prepare_workers": "shards are byte-identical for any number of workers",
    "data.prepare_pool": "shards are byte-identical whether processes or threads write them",
    "data.max_reject_fraction": "a pass/fail limit; the samples that pass are in the data fingerprint",
    "model.path": "the base model's content hash stands in for its location",
    "model.build_tiny_if_missing": "how a missing test model is made, not which one is used",
    "model.cache_dir": "where downloads are kept",
    "model.trust_remote_code": "the model's files (in its content hash) decide the code",
    "lora.merge_dtype": "used after training, by the merge",
    "lora.merge_tolerance": "used after training, by the merge",
    "train.output_dir": "where the run is written",
    "train.run_subdir": "where the run is written",
    "train.resume_from": "where a run starts from, recorded as lineage instead",
    "train.save_steps": "when checkpoints are written",
    "train.save_total_limit": "how many checkpoints are kept",
    "train.logging_steps": "how often metrics are logged",
    "train.eval_steps": "how often evaluation runs (it does not touch the weights)",
    "train.eval_on_start": "whether evaluation also runs at step 0",
    "train.launcher": "which launcher starts the same ranks",
    "train.packing": "lays out each micro-batch's same samples in fewer rows; losses equal the unpacked ones",
    "train.pack_max_tokens": "the row length of packing, a layout of the same samples",
    "train.pack_max_tiles": "the tile budget of a packed row, a layout of the same samples",
    "train.node_rank": "differs between the nodes of one run",
    "train.master_addr": "rendezvous address",
    "train.master_port": "rendezvous port",
    "train.slurm.partition": "where the Slurm job runs",
    "train.slurm.account": "who the Slurm job is charged to",
    "train.slurm.time": "how long one Slurm job may run (a retry resumes the run)",
    "train.slurm.gpus_per_node": "the GPUs the ranks run on, not what they compute",
    "train.slurm.cpus_per_task": "the CPU cores each rank gets",
    "train.slurm.extra_sbatch": "scheduling options of the Slurm job",
    "train.ssh_port": "how the nodes are reached",
    "train.include": "which hosts run the ranks; the processes per node they leave are train.hostfile's identity value",
    "train.exclude": "which hosts run the ranks; the processes per node they leave are train.hostfile's identity value",
    "train.shared_output_dir": "where checkpoint files meet (a shared folder or storage), not what they hold",
    "storage": "where checkpoints and models are uploaded",
    "logging": "where metrics are reported",
    "eval": "evaluation and promotion read the trained weights, they do not change them",
}
_SKIP_FILES = (".download-complete",)  # markers of our fetch cache, not model content


class IdentityMismatch(ConfigError):
    """The run folder or checkpoint belongs to a run with other settings, data or base model."""


@dataclass(frozen=True)
class RunIdentity:
    """The identity hash and what it was made of."""

    id: str
    settings: dict[str, Any]  # dotted config key -> value, for the settings in the identity
    data: str  # data fingerprint (manifest.json)
    model: str  # content hash of the base model's files
    parent: dict[str, Any] | None = field(default=None, compare=False)  # checkpoint continued on purpose

    @property
    def short(self) -> str:
        return self.id[:8]

    def run_id(self, name: str) -> str:
        """The run's name in storage and in per-identity run folders: `{name}-{identity[:8]}`."""
        return f"{name}-{self.short}"


def identity_settings(cfg: FinetuneConfig) -> dict[str, Any]:
    """The config as dotted keys, less the settings in NOT_IN_IDENTITY."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if prefix in NOT_IN_IDENTITY:
            return
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            flat[prefix] = value

    walk("", cfg.model_dump(mode="json"))
    if cfg.train.hostfile is not None:  # the processes per node decide the data split, not the hosts' names
        from vlm_core.multinode import active_hosts

        flat["train.hostfile"] = list(active_hosts(cfg).values())
    return flat


def make_identity(cfg: FinetuneConfig, data_fingerprint: str, model_hash: str) -> RunIdentity:
    settings = identity_settings(cfg)
    blob = json.dumps({"settings": settings, "data": data_fingerprint, "model": model_hash}, sort_keys=True)
    return RunIdentity(hashlib.sha256(blob.encode()).hexdigest(), settings, data_fingerprint, model_hash)


def _file_hash(path: Path, cache: dict[str, Any]) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so multi-GB weights are read once per copy."""
    from vlm_core.storage import sha256_file

    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if key not in cache:
        cache[key] = sha256_file(path)
    return cache[key]


def model_hash(folder: str | Path, cache_dir: str | Path) -> str:
    """Content hash of every file in a model folder (weights, config, tokenizer, templates)."""
    folder = Path(folder)
    cache_file = Path(cache_dir).expanduser() / "file_hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    known = len(cache)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in _SKIP_FILES)
    parts = {p.relative_to(folder).as_posix(): _file_hash(p, cache) for p in files}
    if len(cache) != known:  # remember new hashes; a write race only costs a re-hash later
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(cache_file)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def compute_identity(cfg: FinetuneConfig, data_fingerprint: str | None = None) -> RunIdentity:
    """The identity of the run `cfg` describes; the data fingerprint is read from the shards' manifest
    unless given (the retrain flow knows it from planning, before any shard is written)."""
    from vlm_core.data.manifest import read_manifest
    from vlm_core.model.load import resolve_model_path

    if data_fingerprint is None:
        manifest = read_manifest(cfg.data.shards)
        if manifest is None:
            raise ConfigError(f"data.shards={cfg.data.shards}: no manifest.json there; prepare the shards first "
                              "(vlmft prepare, or vlmft run for the whole pipeline)")
        data_fingerprint = manifest.fingerprint
    return make_identity(cfg, data_fingerprint, model_hash(resolve_model_path(cfg.model), cfg.model.cache_dir))


def with_run_dir(cfg: FinetuneConfig, identity: RunIdentity) -> FinetuneConfig:
    """`cfg` with train.output_dir resolved: `{output_dir}/{name}-{identity[:8]}` when train.run_subdir is on."""
    if not cfg.train.run_subdir:
        return cfg
    train = cfg.train.model_copy(update={"output_dir": f"{cfg.train.output_dir.rstrip('/')}/{identity.run_id(cfg.name)}",
                                         "run_subdir": False})
    return cfg.model_copy(update={"train": train})


def read_identity(folder: str | Path) -> dict[str, Any] | None:
    """The identity record of a run folder or a checkpoint, or None when it has none."""
    path = Path(folder) / IDENTITY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def differences(identity: RunIdentity, other: dict[str, Any]) -> list[str]:
    """What differs between `identity` and another run's record: setting names, 'data', 'base model'."""
    mine, theirs = identity.settings, other.get("settings") or {}
    out = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if other.get("data") != identity.data:
        out.append("data (shard fingerprint)")
    if other.get("model") != identity.model:
        out.append("base model (content hash)")
    return out


def mismatch_message(where: str, identity: RunIdentity, other: dict[str, Any] | None, output_dir: str) -> str:
    """One line: whose folder this is, what differs, and the two ways forward."""
    if other is None:
        held = f"{where} was written without a run identity (by an older version)"
    else:
        diff = differences(identity, other)
        shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
        held = f"{where} belongs to run {other['identity'][:12]}, this config is run {identity.id[:12]} (different: {shown})"
    return (f"{held}: refusing to continue it with other settings. Use a new train.output_dir (or "
            f"train.run_subdir=true, which puts each run in {output_dir.rstrip('/')}/NAME-IDENTITY), or continue "
            "it on purpose with train.resume_from=PATH_OF_A_CHECKPOINT")


def claim_run_folder(cfg: FinetuneConfig, identity: RunIdentity) -> RunIdentity:
    """Check that train.output_dir is this run's (or free) and record the identity there.

    With train.resume_from=auto or none, a folder of another identity is refused (IdentityMismatch);
    with train.resume_from=PATH the run continues that checkpoint on purpose, and the checkpoint's own
    identity is recorded as the parent. Returns the identity with its parent filled in.
    """
    out = Path(cfg.train.output_dir)
    existing = read_identity(out)
    choice = cfg.train.resume_from
    parent = None
    if choice not in ("auto", "none"):
        from vlm_core.checkpoints import checkpoint_identity

        parent = {"checkpoint": str(Path(choice).resolve()), "identity": checkpoint_identity(Path(choice))}
    elif existing is not None and existing.get("identity") != identity.id:
        raise IdentityMismatch(mismatch_message(f"train.output_dir={out}", identity, existing, str(out)))
    elif existing is None and any(p.name.startswith("checkpoint-") for p in out.glob("checkpoint-*")):
        raise IdentityMismatch(mismatch_message(f"train.output_dir={out}", identity, None, str(out)))
    if existing is not None and existing.get("identity") == identity.id and parent is None:
        parent = existing.get("parent")
    claimed = RunIdentity(identity.id, identity.settings, identity.data, identity.model, parent)
    out.mkdir(parents=True, exist_ok=True)
    record = {"identity": claimed.id, **{k: v for k, v in asdict(claimed).items() if k != "id"},
              "created": (existing or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = out / f"{IDENTITY_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out / IDENTITY_FILE)
    return claimed


def locate_run(cfg: FinetuneConfig) -> tuple[FinetuneConfig, str | None]:
    """For work on a finished run (merge): `cfg` with its run folder resolved, and its run id.

    The identity is computed when the shards are here. Without them (merging on another machine),
    the run folder's record names it, else the one run of this name in storage; None when neither
    does (several runs of the name in storage, or none).
    """
    import re

    from vlm_core.storage import list_folders

    try:
        identity = compute_identity(cfg)
    except ConfigError:
        identity = None
    if identity is not None:
        return with_run_dir(cfg, identity), identity.run_id(cfg.name)
    recorded = read_identity(cfg.train.output_dir)
    if recorded is not None:
        return cfg, f"{cfg.name}-{recorded['identity'][:8]}"
    if cfg.storage.url:
        pattern = re.compile(rf"{re.escape(cfg.name)}-[0-9a-f]{{8}}")
        runs = [n for n in list_folders(f"{cfg.storage.url.rstrip('/')}/runs") if pattern.fullmatch(n)]
        if len(runs) == 1:
            return cfg, runs[0]
    return cfg, None
