"""Merge a LoRA adapter into its base model, verify, and only then publish.

The merged folder is what anyone downloads: safetensors weights, config, tokenizer, processor and
chat template, loadable with plain `transformers` and no project code. Before the folder appears
under its final name, the merged model is *reloaded from disk* and its logits on a probe batch with
an image are compared with base + adapter; if they differ by more than the tolerance, nothing is
published and the error says by how much. `merge_info.json` records a fingerprint of the inputs,
so merging the same base and adapter again does nothing.

A full fine-tune needs no merge, but a DeepSpeed ZeRO-3 checkpoint is not a model folder: its weights
are partitioned across `global_stepN/` shards and its `model.safetensors` is missing or partial.
`consolidate_checkpoint` gathers them with DeepSpeed's own `zero_to_fp32` reader and publishes the
same kind of verified, plain-transformers folder (a checkpoint that already holds full weights is
re-saved and verified the same way).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import uuid
import zlib
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
    source: str = "lora"  # lora | zero (consolidated from ZeRO shards) | safetensors (full weights re-saved)


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


def _dtype_and_tolerance(base_cfg: dict, dtype: str, tolerance: float | None) -> tuple[str, float]:
    """'auto' keeps the base checkpoint's dtype; the default tolerance follows the dtype."""
    if dtype == "auto":
        dtype = base_cfg.get("dtype") or base_cfg.get("torch_dtype") or "float32"
    return dtype, DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance


def _already_published(out: Path, fp: str) -> MergeReport | None:
    """The report of an earlier publish of the same inputs to `out`, if there was one."""
    if (out / MERGE_INFO).is_file():
        info = json.loads((out / MERGE_INFO).read_text())
        if info.get("fingerprint") == fp:
            return MergeReport(**{**info, "skipped": True})
    return None


def merge_lora(
    model: ModelConfig, adapter: str, out: str | Path, dtype: str = "auto", tolerance: float | None = None
) -> MergeReport:
    """Merge `adapter` (folder or URL) into the base model of `model` and publish it to `out`."""
    from peft import PeftModel
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    base_path = resolve_model_path(model)
    base_cfg = check_model_folder(base_path, model.trust_remote_code)
    adapter_path = _local_adapter(adapter, model.cache_dir)
    dtype, tolerance = _dtype_and_tolerance(base_cfg, dtype, tolerance)
    out = Path(out)
    fp = fingerprint(base_path, adapter_path, dtype)
    if (done := _already_published(out, fp)) is not None:
        return done

    tok = AutoTokenizer.from_pretrained(base_path)
    base = InternVLForConditionalGeneration.from_pretrained(base_path, dtype=torch.float32)
    batch = probe_batch(base.config, tok)
    peft_model = PeftModel.from_pretrained(base, adapter_path)
    reference = _logits(peft_model, batch)
    holder = [peft_model.merge_and_unload().to(getattr(torch, dtype))]
    del base, peft_model  # merged in place: the holder keeps the only reference, so it can be freed
    return _save_verified(holder, base_path, out, reference, batch,
                          MergeReport(str(out), fp, 0.0, 0.0, tolerance, dtype, source="lora"),
                          what="the merged model differs from base + adapter")


def _weight_digests(model) -> dict[str, tuple[str, tuple[int, ...], int]]:
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


def _save_verified(holder: list, base_path: Path, out: Path, reference: torch.Tensor, batch: dict,
                   report: MergeReport, what: str) -> MergeReport:
    """Save the model in `holder` (a one-item list) to a temp folder, reload it, check it, rename it to `out`.

    The model comes in a list that this function empties, and the caller keeps no other reference, so
    the in-memory copy is freed before the reload and peak memory stays near one model, not two. The reload must be bit-identical to what was saved (weight digests)
    and its logits must match `reference` within the report's tolerance; otherwise nothing is published.
    """
    from transformers import InternVLForConditionalGeneration

    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    model = holder.pop()
    try:
        digests = _weight_digests(model)
        model.save_pretrained(tmp)
        _copy_side_files(base_path, tmp)
        del model
        gc.collect()
        reloaded = InternVLForConditionalGeneration.from_pretrained(tmp, dtype=getattr(torch, report.dtype))
        changed = sorted(k for k, v in _weight_digests(reloaded).items() if digests.get(k) != v)
        missing = sorted(set(digests) - set(reloaded.state_dict()))
        if changed or missing:
            raise MergeVerificationError(
                f"refusing to publish {out}: reloading the saved folder did not give back the same weights "
                f"(changed: {changed[:5]}, missing: {missing[:5]}); the key names did not round-trip"
            )
        diff, rel = compare(reference, _logits(reloaded.float(), batch))
        del reloaded
        report.out, report.max_abs_diff, report.relative_diff = str(out), diff, rel
        if not rel <= report.tolerance:
            raise MergeVerificationError(
                f"refusing to publish {out}: {what} by max |Δlogit| = "
                f"{diff:.3g} ({rel:.3g} relative; tolerance {report.tolerance:g})"
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


ZERO_TAG_FILE = "latest"  # DeepSpeed writes the tag of the newest global_stepN/ here
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
_HASH_LIMIT = 64 << 20  # files above this (optimizer shards, full weights) are fingerprinted by size


class CheckpointError(ConfigError):
    """The folder is not a checkpoint of a full fine-tune that can be consolidated."""


def checkpoint_fingerprint(base: Path, checkpoint: Path, dtype: str) -> str:
    """Inputs of a consolidation: the checkpoint's files (content up to 64 MiB, size beyond) and the base config.

    Hashing multi-GB optimizer shards would cost minutes for a check meant to be instant; their names
    and sizes plus the content of every small file (trainer_state.json with its losses, the ZeRO
    model_states, `latest`) change whenever the training run does.
    """
    files = {}
    for p in sorted(x for x in checkpoint.rglob("*") if x.is_file()):
        size = p.stat().st_size
        files[p.relative_to(checkpoint).as_posix()] = _sha(p) if size <= _HASH_LIMIT else size
    parts = {"dtype": dtype, "checkpoint": files, "base_config": _sha(base / "config.json")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _local_checkpoint(checkpoint: str | Path, cache_dir: str) -> Path:
    """A local copy of `checkpoint` (a folder, or a URL of a complete upload fetched once into the cache)."""
    checkpoint = str(checkpoint)
    if "://" not in checkpoint:
        return Path(checkpoint)
    from vlm_core.storage import download_folder

    path = Path(cache_dir).expanduser() / "checkpoints" / hashlib.sha256(checkpoint.encode()).hexdigest()[:16]
    download_folder(checkpoint, path)
    return path


def _has_zero_shards(folder: Path) -> bool:
    tag_file = folder / ZERO_TAG_FILE
    return tag_file.is_file() and (folder / tag_file.read_text().strip()).is_dir()


def _full_weights_model(folder: Path, config):
    """The model from the folder's own full weights (model.safetensors), or (None, why) when absent/partial.

    Under ZeRO-3 the Trainer writes no weights (or empty partitions) unless
    stage3_gather_16bit_weights_on_model_save is on; `from_pretrained` would silently fill the gaps
    with random values, so missing or mis-shaped keys count as "not full" here.
    """
    from transformers import InternVLForConditionalGeneration

    if not (any(folder.glob("model*.safetensors")) or (folder / "model.safetensors.index.json").is_file()):
        return None, "no model.safetensors"
    try:
        model, info = InternVLForConditionalGeneration.from_pretrained(
            folder, config=config, dtype=torch.float32, output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as exc:
        return None, f"model.safetensors does not load ({type(exc).__name__}: {str(exc)[:200]})"
    gaps = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if gaps:
        return None, f"model.safetensors is partial ({len(gaps)} missing or mis-shaped tensors, e.g. {gaps[:3]})"
    return model, ""


def _zero_model(folder: Path, config):
    """Gather the fp32 weights of a ZeRO-1/2/3 checkpoint with DeepSpeed's reader into a model of `config`.

    `get_fp32_state_dict_from_zero_checkpoint` returns the module's runtime parameter names
    (`model.language_model.layers...`), which are this class's `state_dict()` keys; loading with
    strict=True proves every tensor found its place. (The *saved* file uses transformers' original
    key format; `save_pretrained` takes care of that.)
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import InternVLForConditionalGeneration
    from transformers.initialization import no_init_weights

    state = get_fp32_state_dict_from_zero_checkpoint(str(folder))
    for prefix in ("module.", "_orig_mod."):  # wrappers (DDP-style, torch.compile) some scripts train through
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    with no_init_weights():  # the weights are about to be replaced: skip the random init (time, memory)
        model = InternVLForConditionalGeneration(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{folder}: the ZeRO shards do not hold the weights of the base model's architecture "
            f"({str(exc)[:400]}); check that model.path is the model this run trained"
        ) from exc
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.float()


def consolidate_checkpoint(
    checkpoint_dir: str | Path, model: ModelConfig, out: str | Path, dtype: str = "auto",
    tolerance: float | None = None,
) -> MergeReport:
    """Turn a full fine-tune's `checkpoint-N/` (folder or URL) into a verified plain-transformers model at `out`.

    Full weights in the checkpoint (ZeRO-1/2, no DeepSpeed, ZeRO-3 with 16-bit gathering) are used as
    they are; otherwise the ZeRO shards are consolidated. The config and the tokenizer/processor/chat
    template files come from the base model (model.path). Published only after a reload from disk
    gives back bit-identical weights and the same logits; the same inputs again do nothing.
    """
    from transformers import AutoConfig, AutoTokenizer

    base_path = resolve_model_path(model)
    base_cfg = check_model_folder(base_path, model.trust_remote_code)
    folder = _local_checkpoint(checkpoint_dir, model.cache_dir)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint_dir}: no such folder")
    adapter = [n for n in ADAPTER_FILES if (folder / n).is_file()]
    if adapter:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} is a LoRA checkpoint ({', '.join(adapter)}): merge it into the base "
            "model with merge_lora (lora.enabled=true) instead of consolidating it"
        )
    dtype, tolerance = _dtype_and_tolerance(base_cfg, dtype, tolerance)
    out = Path(out)
    fp = checkpoint_fingerprint(base_path, folder, dtype)
    if (done := _already_published(out, fp)) is not None:
        return done

    config = AutoConfig.from_pretrained(base_path)
    full, why = _full_weights_model(folder, config)
    if full is not None:
        holder, source = [full], "safetensors"
    elif _has_zero_shards(folder):
        holder, source = [_zero_model(folder, config)], "zero"
    else:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir}: {why} and no DeepSpeed ZeRO shards ('{ZERO_TAG_FILE}' naming a "
            "global_stepN/ folder); expected a checkpoint-N folder written by the Trainer of a full fine-tune"
        )
    del full
    batch = probe_batch(config, AutoTokenizer.from_pretrained(base_path))
    reference = _logits(holder[0], batch)  # fp32, before any cast to the published dtype
    holder[0].to(getattr(torch, dtype))
    holder[0].config.dtype = dtype
    return _save_verified(holder, base_path, out, reference, batch,
                          MergeReport(str(out), fp, 0.0, 0.0, tolerance, dtype, source=source),
                          what=f"the saved model differs from checkpoint {checkpoint_dir}")
