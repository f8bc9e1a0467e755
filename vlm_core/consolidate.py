"""Turn a full fine-tune's checkpoint into a verified plain-transformers model folder.

A full fine-tune needs no merge, but a DeepSpeed ZeRO-3 checkpoint is not a model folder: its weights
are partitioned across `global_stepN/` shards and its `model.safetensors` is missing or partial.
`consolidate_checkpoint` gathers them with DeepSpeed's own `zero_to_fp32` reader (a checkpoint that
already holds full weights is re-saved as it is) and publishes it with the base model's config and
tokenizer files, verified the same way as a LoRA merge (vlm_core.publish): the reload from disk must
give back bit-identical weights and the same logits as the checkpoint's own weights.
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
    MergeReport,
    already_published,
    dtype_and_tolerance,
    probe_batch,
    probe_logits,
    save_verified,
)
from vlm_core.safe_load import check_checkpoint_files, torch_load_weights_only
from vlm_core.storage import sha256_file

ZERO_TAG_FILE = "latest"  # DeepSpeed writes the tag of the newest global_stepN/ here
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
_HASH_LIMIT = 64 << 20  # files above this (optimizer shards, full weights) are fingerprinted by size


class CheckpointError(ConfigError):
    """The folder is not a checkpoint of a full fine-tune that can be consolidated."""


def checkpoint_fingerprint(base: Path, checkpoint: Path, dtype: str, data: DataConfig) -> str:
    """Inputs of a consolidation: the checkpoint's files (content up to 64 MiB, size beyond), the base config
    and the training settings the published processor is written from.

    Hashing multi-GB optimizer shards would cost minutes for a check meant to be instant; their names
    and sizes plus the content of every small file (trainer_state.json with its losses, the ZeRO
    model_states, `latest`) change whenever the training run does.
    """
    files = {}
    for p in sorted(x for x in checkpoint.rglob("*") if x.is_file()):
        rel, size = p.relative_to(checkpoint).as_posix(), p.stat().st_size
        if rel != COMPLETE_MARKER:  # written by the download cache, not part of the checkpoint
            files[rel] = sha256_file(p) if size <= _HASH_LIMIT else size
    parts = {"dtype": dtype, "checkpoint": files, "base_config": sha256_file(base / "config.json"),
             "processor": publish_settings(data)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _local_checkpoint(checkpoint: str | Path, cache_dir: str) -> Path:
    """A local copy of `checkpoint` (a folder, or a URL of a complete upload fetched once into the cache)."""
    checkpoint = str(checkpoint)
    if "://" not in checkpoint:
        return Path(checkpoint)
    return fetch_to_cache(checkpoint, cache_dir, "checkpoints", verified=True)


def _has_zero_shards(folder: Path) -> bool:
    tag_file = folder / ZERO_TAG_FILE
    return tag_file.is_file() and (folder / tag_file.read_text().strip()).is_dir()


def _full_weights_model(folder: Path, config) -> tuple[torch.nn.Module | None, str]:
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


def _zero_model(folder: Path, config) -> torch.nn.Module:
    """Gather the fp32 weights of a ZeRO-1/2/3 checkpoint with DeepSpeed's reader into a model of `config`.

    `get_fp32_state_dict_from_zero_checkpoint` returns the module's runtime parameter names
    (`model.language_model.layers...`), which are this class's `state_dict()` keys; loading with
    strict=True proves every tensor found its place. (The *saved* file uses transformers' original
    key format; `save_pretrained` takes care of that.)
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import InternVLForConditionalGeneration
    from transformers.initialization import no_init_weights

    with torch_load_weights_only():  # zero_to_fp32 asks for weights_only=False
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


def _checkpoint_folder(checkpoint_dir: str | Path, cache_dir: str) -> Path:
    """The local checkpoint folder; a CheckpointError when it is missing or a LoRA adapter."""
    folder = _local_checkpoint(checkpoint_dir, cache_dir)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint_dir}: no such folder")
    adapter = [n for n in ADAPTER_FILES if (folder / n).is_file()]
    if adapter:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} is a LoRA checkpoint ({', '.join(adapter)}): merge it into the base "
            "model with merge_lora (lora.enabled=true) instead of consolidating it"
        )
    return folder


def _checkpoint_model(folder: Path, checkpoint_dir: str | Path, config) -> tuple[list[torch.nn.Module], str]:
    """([the fp32 model], source): the folder's full weights when complete, else its gathered ZeRO shards."""
    full, why = _full_weights_model(folder, config)
    if full is not None:
        return [full], "safetensors"
    if _has_zero_shards(folder):
        return [_zero_model(folder, config)], "zero"
    raise CheckpointError(
        f"checkpoint {checkpoint_dir}: {why} and no DeepSpeed ZeRO shards ('{ZERO_TAG_FILE}' naming a "
        "global_stepN/ folder); expected a checkpoint-N folder written by the Trainer of a full fine-tune"
    )


def consolidate_checkpoint(
    checkpoint_dir: str | Path, model: ModelConfig, out: str | Path, dtype: str = "auto",
    tolerance: float | None = None, *, data: DataConfig,
) -> MergeReport:
    """Turn a full fine-tune's `checkpoint-N/` (folder or URL) into a verified plain-transformers model at `out`.

    Full weights in the checkpoint (ZeRO-1/2, no DeepSpeed, ZeRO-3 with 16-bit gathering) are used as
    they are; otherwise the ZeRO shards are consolidated. The config and the tokenizer/processor/chat
    template files come from the base model (model.path), the processor settings from `data` (the
    training run's cfg.data). Published only after a reload from disk gives back bit-identical weights
    and the same logits, and its processor preprocesses like training; the same inputs again do nothing.
    """
    from transformers import AutoConfig, AutoTokenizer

    check_publishable(data)
    base_path = resolve_model_path(model)
    base_cfg = check_model_folder(base_path, model.trust_remote_code)
    folder = _checkpoint_folder(checkpoint_dir, model.cache_dir)
    check_checkpoint_files(folder)  # a crafted pickle fails here, naming the file, before anything reads it
    dtype, tolerance = dtype_and_tolerance(base_cfg, dtype, tolerance)
    out = Path(out)
    fp = checkpoint_fingerprint(base_path, folder, dtype, data)
    if (done := already_published(out, fp)) is not None:
        return done

    config = AutoConfig.from_pretrained(base_path)
    holder, source = _checkpoint_model(folder, checkpoint_dir, config)  # the holder keeps the only reference
    batch = probe_batch(config, AutoTokenizer.from_pretrained(base_path))
    reference = probe_logits(holder[0], batch)  # fp32, before any cast to the published dtype
    holder[0].to(getattr(torch, dtype))
    holder[0].config.dtype = dtype
    return save_verified(holder, base_path, out, reference, batch,
                         MergeReport(str(out), fp, 0.0, 0.0, tolerance, dtype, source=source),
                         what=f"the saved model differs from checkpoint {checkpoint_dir}", data=data)


def load_checkpoint_model(checkpoint: Path, source: str, config) -> torch.nn.Module:
    """The fp32 model of a full fine-tune's local checkpoint folder (its full weights, else its ZeRO shards),
    for using it without publishing it (generation). Its pickle-based files are checked first."""
    check_checkpoint_files(checkpoint)
    return _checkpoint_model(checkpoint, source, config)[0][0]
