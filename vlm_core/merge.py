"""Merge a LoRA adapter into its base model, verify, and only then publish.

A LoRA run leaves an adapter, which needs the project's PEFT setup and the base model to use. Merging
it gives a plain-transformers model folder anyone can load. The reference for the check is base +
adapter: its logits on a probe batch with an image are computed before merging, and the merged
model, reloaded from disk, must reproduce them within the tolerance (vlm_core.publish saves,
reloads, checks and publishes). The fingerprint of the inputs covers the adapter's files by content,
so merging the same base and adapter again does nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from vlm_core.config import ConfigError, DataConfig, ModelConfig
from vlm_core.hf_processor import check_publishable, publish_settings
from vlm_core.model.load import COMPLETE_MARKER, check_model_folder, fetch_to_cache, resolve_model_path
from vlm_core.publish import (
    DEFAULT_TOLERANCE,
    MERGE_INFO,
    WEIGHT_SUFFIXES,
    MergeReport,
    MergeVerificationError,
    already_published,
    compare,
    dtype_and_tolerance,
    probe_batch,
    probe_logits,
    save_verified,
)
from vlm_core.storage import sha256_file


def adapter_fingerprint(base: Path, adapter: Path, dtype: str, data: DataConfig) -> str:
    """Inputs of a merge: the adapter's files by content, the base by config and weight file sizes, and the
    training settings the published processor is written from."""
    parts = {"dtype": dtype, "processor": publish_settings(data),
             "adapter": {p.name: sha256_file(p) for p in sorted(adapter.iterdir())
                         if p.is_file() and p.name != COMPLETE_MARKER},
             "base_config": sha256_file(base / "config.json"),
             "base_weights": {p.name: p.stat().st_size for p in sorted(base.iterdir()) if p.suffix in WEIGHT_SUFFIXES}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _local_adapter(adapter: str, cache_dir: str) -> Path:
    """A local copy of `adapter` (a folder, or a URL of a complete upload fetched once into the cache)."""
    path = Path(adapter) if "://" not in adapter else fetch_to_cache(adapter, cache_dir, "adapters", verified=True)
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"adapter {adapter}: no adapter_config.json there (expected a LoRA checkpoint folder)")
    return path


def verify_merged(base_path: str | Path, adapter: str | Path, merged: str | Path, tolerance: float | None = None) -> MergeReport:
    """Re-check a published merge: merged logits vs base + adapter; raise when they differ."""
    from peft import PeftModel
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    base_path, adapter, merged = Path(base_path), Path(adapter), Path(merged)
    info = json.loads((merged / MERGE_INFO).read_text()) if (merged / MERGE_INFO).is_file() else {}
    dtype = info.get("dtype", "float32")
    tolerance = tolerance if tolerance is not None else info.get("tolerance", DEFAULT_TOLERANCE[dtype])
    tok = AutoTokenizer.from_pretrained(base_path)
    base = InternVLForConditionalGeneration.from_pretrained(base_path, dtype=torch.float32)
    batch = probe_batch(base.config, tok)
    reference = probe_logits(PeftModel.from_pretrained(base, adapter), batch)
    got = probe_logits(InternVLForConditionalGeneration.from_pretrained(merged, dtype=torch.float32), batch)
    diff, rel = compare(reference, got)
    report = MergeReport(str(merged), info.get("fingerprint", ""), diff, rel, tolerance, dtype)
    if not rel <= tolerance:
        raise MergeVerificationError(
            f"merged model {merged} differs from base + adapter by max |Δlogit| = {diff:.3g} "
            f"({rel:.3g} relative; tolerance {tolerance:g})"
        )
    return report


def merge_lora(
    model: ModelConfig, adapter: str, out: str | Path, dtype: str = "auto", tolerance: float | None = None,
    *, data: DataConfig,
) -> MergeReport:
    """Merge `adapter` (folder or URL) into the base model of `model` and publish it to `out`.

    `data` is the training run's cfg.data: the published processor preprocesses as it says.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    check_publishable(data)
    base_path = resolve_model_path(model)
    base_cfg = check_model_folder(base_path, model.trust_remote_code)
    adapter_path = _local_adapter(adapter, model.cache_dir)
    dtype, tolerance = dtype_and_tolerance(base_cfg, dtype, tolerance)
    out = Path(out)
    fp = adapter_fingerprint(base_path, adapter_path, dtype, data)
    if (done := already_published(out, fp)) is not None:
        return done

    tok = AutoTokenizer.from_pretrained(base_path)
    base = InternVLForConditionalGeneration.from_pretrained(base_path, dtype=torch.float32)
    batch = probe_batch(base.config, tok)
    peft_model = PeftModel.from_pretrained(base, adapter_path)
    reference = probe_logits(peft_model, batch)
    holder = [peft_model.merge_and_unload().to(getattr(torch, dtype))]
    del base, peft_model  # merged in place: the holder keeps the only reference, so it can be freed
    return save_verified(holder, base_path, out, reference, batch,
                         MergeReport(str(out), fp, 0.0, 0.0, tolerance, dtype, source="lora"),
                         what="the merged model differs from base + adapter", data=data)
