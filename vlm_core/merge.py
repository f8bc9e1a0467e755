"""Merge a LoRA adapter into its base model, verify, and only then publish.

The merged folder is what anyone downloads: safetensors weights, config, tokenizer, processor and
chat template, loadable with plain `transformers` and no project code. Before the folder appears
under its final name, the merged model is *reloaded from disk* and its logits on a probe batch with
an image are compared with base + adapter; if they differ by more than the tolerance, nothing is
published and the error says by how much. `merge_info.json` records a fingerprint of the inputs,
so merging the same base and adapter again does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vlm_core.config import ConfigError, ModelConfig
from vlm_core.model.load import check_model_folder, resolve_model_path

MERGE_INFO = "merge_info.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


class MergeVerificationError(RuntimeError):
    """The merged model does not reproduce base + adapter; nothing was published."""


@dataclass
class MergeReport:
    out: str
    fingerprint: str
    max_abs_diff: float
    relative_diff: float
    tolerance: float
    dtype: str
    skipped: bool = False


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            h.update(block)
    return h.hexdigest()


def fingerprint(base: Path, adapter: Path, dtype: str) -> str:
    """Inputs of a merge: the adapter's files by content, the base by config and weight file sizes."""
    parts = {"dtype": dtype, "adapter": {p.name: _sha(p) for p in sorted(adapter.iterdir()) if p.is_file()},
             "base_config": _sha(base / "config.json"),
             "base_weights": {p.name: p.stat().st_size for p in sorted(base.iterdir()) if p.suffix in WEIGHT_SUFFIXES}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def probe_batch(config, tokenizer) -> dict:
    """A deterministic one-image conversation with the model's own tile size and image token count."""
    vc = config.vision_config
    size = vc.image_size[0] if isinstance(vc.image_size, list | tuple) else vc.image_size
    image = tokenizer.start_image_token + tokenizer.context_image_token * config.image_seq_length + tokenizer.end_image_token
    text = (f"<|im_start|>user\n{image}\nDescribe the picture.<|im_end|>\n"
            "<|im_start|>assistant\nA test pattern of stripes.<|im_end|>\n")
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, vc.num_channels, size, size, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def _logits(model, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        dtype = next(model.parameters()).dtype
        return model(**{**batch, "pixel_values": batch["pixel_values"].to(dtype)}).logits.float()


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, that divided by max |a|); inf when either has a non-finite value."""
    if not (torch.isfinite(reference).all() and torch.isfinite(candidate).all()):
        return float("inf"), float("inf")
    diff = (reference - candidate).abs().max().item()
    return diff, diff / max(reference.abs().max().item(), 1e-12)


def _local_adapter(adapter: str, cache_dir: str) -> Path:
    if "://" not in adapter:
        path = Path(adapter)
    else:
        from vlm_core.storage import download_folder

        path = Path(cache_dir).expanduser() / "adapters" / hashlib.sha256(adapter.encode()).hexdigest()[:16]
        download_folder(adapter, path)
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"adapter {adapter}: no adapter_config.json there (expected a LoRA checkpoint folder)")
    return path


def _copy_side_files(base: Path, dest: Path) -> None:
    """Tokenizer, processor, chat template and generation config travel with the weights."""
    for p in base.iterdir():
        if p.is_file() and p.suffix not in WEIGHT_SUFFIXES and not p.name.endswith(".index.json") and p.name != "config.json":
            shutil.copy2(p, dest / p.name)


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
    reference = _logits(PeftModel.from_pretrained(base, adapter), batch)
    got = _logits(InternVLForConditionalGeneration.from_pretrained(merged, dtype=torch.float32), batch)
    diff, rel = compare(reference, got)
    report = MergeReport(str(merged), info.get("fingerprint", ""), diff, rel, tolerance, dtype)
    if not rel <= tolerance:
        raise MergeVerificationError(
            f"merged model {merged} differs from base + adapter by max |Δlogit| = {diff:.3g} "
            f"({rel:.3g} relative; tolerance {tolerance:g})"
        )
    return report


def merge_lora(
    model: ModelConfig, adapter: str, out: str | Path, dtype: str = "auto", tolerance: float | None = None
) -> MergeReport:
    """Merge `adapter` (folder or URL) into the base model of `model` and publish it to `out`."""
    from peft import PeftModel
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    base_path = resolve_model_path(model)
    base_cfg = check_model_folder(base_path, model.trust_remote_code)
    adapter_path = _local_adapter(adapter, model.cache_dir)
    if dtype == "auto":
        dtype = base_cfg.get("dtype") or base_cfg.get("torch_dtype") or "float32"
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    out = Path(out)
    fp = fingerprint(base_path, adapter_path, dtype)
    if (out / MERGE_INFO).is_file():
        info = json.loads((out / MERGE_INFO).read_text())
        if info.get("fingerprint") == fp:
            return MergeReport(**{**info, "skipped": True})

    tok = AutoTokenizer.from_pretrained(base_path)
    base = InternVLForConditionalGeneration.from_pretrained(base_path, dtype=torch.float32)
    batch = probe_batch(base.config, tok)
    peft_model = PeftModel.from_pretrained(base, adapter_path)
    reference = _logits(peft_model, batch)
    merged = peft_model.merge_and_unload().to(getattr(torch, dtype))

    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        merged.save_pretrained(tmp)
        _copy_side_files(base_path, tmp)
        reloaded = InternVLForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32)
        diff, rel = compare(reference, _logits(reloaded, batch))
        report = MergeReport(str(out), fp, diff, rel, tolerance, dtype)
        if not rel <= tolerance:
            raise MergeVerificationError(
                f"refusing to publish {out}: the merged model differs from base + adapter by max |Δlogit| = "
                f"{diff:.3g} ({rel:.3g} relative; tolerance {tolerance:g})"
            )
        info = {k: v for k, v in asdict(report).items() if k != "skipped"}
        (tmp / MERGE_INFO).write_text(json.dumps(info, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return report
