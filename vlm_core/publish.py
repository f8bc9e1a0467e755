"""Publish a model folder only after it has been reloaded from disk and checked.

A merged LoRA model (vlm_core.merge) and a consolidated full fine-tune (vlm_core.consolidate) end
the same way, and this module is that shared end. The folder is what anyone downloads: safetensors
weights, config, tokenizer, processor and chat template, loadable with plain `transformers` and no
project code. Its processor configs are rewritten from the training config, so `AutoProcessor`
tiles, normalises and templates inputs as training did (vlm_core.hf_processor). It is saved to a
temporary folder next to `out` and *reloaded from disk*; the reload must give back bit-identical
weights (CRC digests of every tensor) and, on a probe batch with an image, logits within the
tolerance of a reference computed before saving, and its processor must give a probe image the same
prompt ids and pixels as training's preprocessing. Only then is it renamed to `out`; otherwise
nothing is published and the error says what differs and by how much.
`merge_info.json` records a fingerprint of the inputs, so publishing the same inputs again does
nothing.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import uuid
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vlm_core.config import DataConfig
from vlm_core.hf_processor import processor_difference, write_processor_files

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
    source: str = "lora"  # lora | zero (consolidated from ZeRO shards) | safetensors (full weights re-saved)


def dtype_and_tolerance(base_cfg: dict, dtype: str, tolerance: float | None) -> tuple[str, float]:
    """'auto' keeps the base checkpoint's dtype; the default tolerance follows the dtype."""
    if dtype == "auto":
        dtype = base_cfg.get("dtype") or base_cfg.get("torch_dtype") or "float32"
    return dtype, DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance


def already_published(out: Path, fp: str) -> MergeReport | None:
    """The report of an earlier publish of the same inputs to `out`, if there was one."""
    if (out / MERGE_INFO).is_file():
        info = json.loads((out / MERGE_INFO).read_text())
        if info.get("fingerprint") == fp:
            return MergeReport(**{**info, "skipped": True})
    return None


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


def probe_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The model's fp32 logits on `batch` (the pixels cast to the model's dtype), without gradients."""
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


def copy_side_files(base: Path, dest: Path) -> None:
    """Tokenizer, processor, chat template and generation config travel with the weights."""
    for p in base.iterdir():
        if p.is_file() and p.suffix not in WEIGHT_SUFFIXES and not p.name.endswith(".index.json") and p.name != "config.json":
            shutil.copy2(p, dest / p.name)


def _weight_digests(model: torch.nn.Module) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """(dtype, shape, crc32 of the bytes) of every tensor: proves a reload is bit-identical without a second copy.

    CRC32 rather than sha256: it guards against wrong key mapping, casts and truncated files, not an
    adversary, and runs at memory speed (~2x faster than sha256, no copy of the tensor's bytes).
    """
    out = {}
    for name, t in model.state_dict().items():
        data = t.detach().contiguous().cpu()
        raw = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""
        out[name] = (str(data.dtype), tuple(data.shape), zlib.crc32(raw))
    return out


def _check_reload(tmp: Path, out: Path, digests: dict, reference: torch.Tensor, batch: dict,
                  report: MergeReport, what: str) -> None:
    """Reload the saved folder: same weights bit for bit, logits within tolerance; fill in the report's diffs."""
    from transformers import InternVLForConditionalGeneration

    reloaded = InternVLForConditionalGeneration.from_pretrained(tmp, dtype=getattr(torch, report.dtype))
    changed = sorted(k for k, v in _weight_digests(reloaded).items() if digests.get(k) != v)
    missing = sorted(set(digests) - set(reloaded.state_dict()))
    if changed or missing:
        raise MergeVerificationError(
            f"refusing to publish {out}: reloading the saved folder did not give back the same weights "
            f"(changed: {changed[:5]}, missing: {missing[:5]}); the key names did not round-trip"
        )
    diff, rel = compare(reference, probe_logits(reloaded.float(), batch))
    del reloaded
    report.out, report.max_abs_diff, report.relative_diff = str(out), diff, rel
    if not rel <= report.tolerance:
        raise MergeVerificationError(
            f"refusing to publish {out}: {what} by max |Δlogit| = "
            f"{diff:.3g} ({rel:.3g} relative; tolerance {report.tolerance:g})"
        )


def save_verified(holder: list[torch.nn.Module], base_path: Path, out: Path, reference: torch.Tensor, batch: dict,
                  report: MergeReport, what: str, data: DataConfig) -> MergeReport:
    """Save the model in `holder` (a one-item list) to a temp folder, reload it, check it, rename it to `out`.

    The model comes in a list that this function empties, and the caller keeps no other reference, so
    the in-memory copy is freed before the reload and peak memory stays near one model, not two. The
    reload must be bit-identical to what was saved (weight digests) and its logits must match
    `reference` within the report's tolerance; otherwise nothing is published and the error says
    `what` differs by how much. The side files (tokenizer, processor, ...) come from `base_path`, the
    processor configs are then rewritten from `data` (the training run's cfg.data) and checked.
    """
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    model = holder.pop()
    try:
        digests = _weight_digests(model)
        model.save_pretrained(tmp)
        copy_side_files(base_path, tmp)
        write_processor_files(tmp, data, model.config)
        del model
        gc.collect()
        _check_reload(tmp, out, digests, reference, batch, report, what)
        if (problem := processor_difference(tmp, data)) is not None:
            raise MergeVerificationError(f"refusing to publish {out}: {problem}")
        info = {k: v for k, v in asdict(report).items() if k != "skipped"}
        (tmp / MERGE_INFO).write_text(json.dumps(info, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return report
