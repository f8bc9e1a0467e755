"""Flow: a run's checkpoint → verified plain-transformers model, uploaded next to the run's checkpoints.

    vlmft merge --config configs/lora.yaml [--adapter PATH_OR_URL] [--out DIR]

With lora.enabled the checkpoint's LoRA adapter is merged into the base model; for a full fine-tune
the checkpoint itself is consolidated (ZeRO-3 shards gathered into safetensors, or full weights
re-saved) with the base model's config, tokenizer and processor files. Without --adapter the newest
complete checkpoint of the run is used: in train.output_dir, else in
{storage.url}/runs/{name}/. The merged folder goes to train.output_dir/merged and, with storage.url,
to {storage.url}/runs/{name}/merged.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tasks.merge import consolidate_task, merge_task
from tasks.storage import load_storage_credentials, upload_folder_task
from vlm_core.checkpoints import newest_checkpoint, run_url
from vlm_core.config import ConfigError, FinetuneConfig


def newest_adapter(cfg: FinetuneConfig) -> str:
    """The newest complete checkpoint of the run (a LoRA adapter, or a full fine-tune's checkpoint)."""
    if cfg.storage.url:
        load_storage_credentials(cfg)
    found = newest_checkpoint(cfg.train.output_dir, cfg.storage.url, cfg.name)
    if found is None:
        raise ConfigError(
            f"no complete checkpoint in train.output_dir={cfg.train.output_dir}"
            + (f" or {run_url(cfg.storage.url, cfg.name)}" if cfg.storage.url else "")
            + "; pass --adapter PATH_OR_URL"
        )
    return found


@flow(name="merge")
def merge(cfg: FinetuneConfig, adapter: str | None = None, out: str | None = None) -> dict:
    """Merge the run's LoRA adapter into its base model (or consolidate a full fine-tune), verify, publish."""
    adapter = adapter or newest_adapter(cfg)
    out = out or str(Path(cfg.train.output_dir) / "merged")
    result = merge_task(cfg, adapter, out) if cfg.lora.enabled else consolidate_task(cfg, adapter, out)
    if cfg.storage.url:
        result["uploaded_to"] = upload_folder_task(cfg, out, f"{run_url(cfg.storage.url, cfg.name)}/merged")["url"]
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

