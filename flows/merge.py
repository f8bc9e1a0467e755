"""Flow: a run's checkpoint → verified plain-transformers model, uploaded next to the run's checkpoints.

    vlmft merge --config configs/lora.yaml [--adapter PATH_OR_URL] [--out DIR]

With lora.enabled the checkpoint's LoRA adapter is merged into the base model; for a full fine-tune
the checkpoint itself is consolidated (ZeRO-3 shards gathered into safetensors, or full weights
re-saved) with the base model's config, tokenizer and processor files. Without --adapter the newest
complete checkpoint of the run is used: in train.output_dir, else in
{storage.url}/runs/{name}-{identity[:8]}/ (the run id, vlm_core.identity.locate_run). The merged
folder goes to train.output_dir/merged and, with storage.url, next to the run's checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tasks.merge import consolidate_task, merge_task
from tasks.storage import load_storage_credentials, upload_folder_task
from vlm_core.checkpoints import checkpoint_identity, newest_checkpoint, run_url
from vlm_core.config import ConfigError, FinetuneConfig
from vlm_core.data.manifest import read_manifest
from vlm_core.identity import locate_run
from vlm_core.lineage import build_lineage, write_model_card
from vlm_core.preflight import preflight

# The flow parameter's default: the Prefect UI's "Quick run" opens the run form when a parameter has none.
BUILT_IN_CONFIG = FinetuneConfig()


def newest_adapter(cfg: FinetuneConfig, run_id: str | None) -> str:
    """The newest complete checkpoint of the run (a LoRA adapter, or a full fine-tune's checkpoint)."""
    found = newest_checkpoint(cfg.train.output_dir, cfg.storage.url if run_id else "", run_id or "")
    if found is None:
        where = f" or {run_url(cfg.storage.url, run_id)}" if cfg.storage.url and run_id else ""
        raise ConfigError(f"no complete checkpoint in train.output_dir={cfg.train.output_dir}{where}; "
                          "pass --adapter PATH_OR_URL")
    written_by = checkpoint_identity(Path(found)) if "://" not in found else None
    if run_id and written_by and not run_id.endswith(f"-{written_by[:8]}"):
        raise ConfigError(f"{found} was written by run {written_by[:12]}, not by this config's run {run_id}: the "
                          "settings, data or base model changed since; train this config first, or pass --adapter")
    return found


@flow(name="merge")
def merge(cfg: FinetuneConfig = BUILT_IN_CONFIG, adapter: str | None = None, out: str | None = None) -> dict:
    """Merge the run's LoRA adapter into its base model (or consolidate a full fine-tune), verify, publish."""
    if cfg.storage.url:
        load_storage_credentials(cfg)
    preflight(cfg, "merge")  # the base model and storage, before the merge loads anything
    cfg, run_id = locate_run(cfg)
    if cfg.storage.url and run_id is None:
        raise ConfigError(
            f"cannot tell which run of {cfg.name!r} to publish to storage.url={cfg.storage.url}: no manifest in "
            f"data.shards={cfg.data.shards}, no run_identity.json in train.output_dir={cfg.train.output_dir}, and not "
            f"exactly one run {cfg.name}-IDENTITY in storage; merge where the run's shards or folder are, or set "
            "storage.url= to merge without uploading")
    adapter = adapter or newest_adapter(cfg, run_id)
    out = out or str(Path(cfg.train.output_dir) / "merged")
    result = merge_task(cfg, adapter, out) if cfg.lora.enabled else consolidate_task(cfg, adapter, out)
    if read_manifest(cfg.data.shards) is not None:  # a model card and lineage.json (the finetune flow adds metrics)
        write_model_card(out, cfg, None, build_lineage(cfg, model_url=out))
    if cfg.storage.url and run_id:
        result["uploaded_to"] = upload_folder_task(cfg, out, f"{run_url(cfg.storage.url, run_id)}/merged")["url"]
    create_markdown_artifact(
        f"# Merged model\n\n- {'adapter' if cfg.lora.enabled else 'checkpoint'}: `{adapter}` ({result['source']})\n"
        f"- merged: `{out}`\n"
        + (f"- in storage: `{result['uploaded_to']}`\n" if "uploaded_to" in result else "")
        + f"- verification: max |Δlogit| {result['max_abs_diff']:.3g} ({result['relative_diff']:.3g} relative, "
        f"tolerance {result['tolerance']:g}; reloaded weights bit-identical)\n",
        key="merged-model",
        description="Where the merged model is and how well it reproduces its checkpoint.",
    )
    return result

