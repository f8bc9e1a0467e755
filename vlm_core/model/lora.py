"""LoRA adapters with peft on the language model and/or the vision encoder.

Adapted parts keep their base weights frozen. Parts that the freezing options leave trainable (the
projector by default, the last N vision layers, ...) go to peft's `modules_to_save`, so they train
in full *and* are saved with the adapter: an adapter-only checkpoint is then complete. Its
adapter_config.json names the base model by absolute folder (or by URL), so plain
`PeftModel.from_pretrained` finds it from any working directory.
"""

from __future__ import annotations

import re

from torch import nn

from vlm_core.config import ConfigError, FinetuneConfig
from vlm_core.model.freeze import LLM, VISION, fully_trained_modules
from vlm_core.model.load import base_model_reference


def target_regex(cfg: FinetuneConfig) -> str:
    """One regex (peft full-matches it against module names) selecting the adapted linear layers."""
    parts = []
    if cfg.lora.llm:
        names = "|".join(map(re.escape, cfg.lora.llm_target_modules))
        parts.append(rf"{re.escape(LLM[0])}\..*\.(?:{names})")
    if cfg.lora.vision:
        names = "|".join(map(re.escape, cfg.lora.vision_target_modules))
        parts.append(rf"{re.escape(VISION)}\..*\.(?:{names})")
    return "|".join(f"(?:{p})" for p in parts)


def apply_lora(model: nn.Module, cfg: FinetuneConfig):
    """Wrap `model` in a peft model with adapters as configured; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    regex = target_regex(cfg)
    matched = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(regex, n)]
    if not matched:
        raise ConfigError(
            f"lora: no linear layer matches lora.llm_target_modules={cfg.lora.llm_target_modules} / "
            f"lora.vision_target_modules={cfg.lora.vision_target_modules}; check the names against the model"
        )
    # peft matches modules_to_save by name suffix; drop the leading "model." for readability.
    keep = [n.removeprefix("model.") for n in fully_trained_modules(model, cfg)]
    peft_cfg = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha or 2 * cfg.lora.r,
        lora_dropout=cfg.lora.dropout,
        target_modules=regex,
        modules_to_save=keep or None,
        bias="none",
    )
    peft_model = get_peft_model(model, peft_cfg)
    # after get_peft_model, which sets it to the name the model was loaded from (relative, or a cache folder)
    peft_model.peft_config["default"].base_model_name_or_path = base_model_reference(cfg.model)
    return peft_model
