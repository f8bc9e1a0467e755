"""Which parts of an InternVL model train: vision encoder, projector, language model.

InternVL fine-tuning recipes differ mostly in what they freeze (upstream's freeze_backbone,
freeze_mlp, freeze_llm, unfreeze_vit_layers). Here each option maps to module name prefixes of
transformers' `InternVLForConditionalGeneration`, so the same list drives plain freezing and
LoRA's `modules_to_save`.
"""

from __future__ import annotations

from torch import nn

from vlm_core.config import ConfigError, FinetuneConfig

VISION = "model.vision_tower"
PROJECTOR = "model.multi_modal_projector"
LLM = ("model.language_model", "lm_head")


def vision_layer_names(model: nn.Module, last_n: int) -> list[str]:
    """Module names of the last `last_n` vision encoder layers."""
    layers = model.get_submodule(f"{VISION}.encoder.layer")
    if last_n > len(layers):
        raise ConfigError(
            f"model.unfreeze_vision_layers={last_n} but the vision encoder has only {len(layers)} layers"
        )
    return [f"{VISION}.encoder.layer.{i}" for i in range(len(layers) - last_n, len(layers))]


def fully_trained_modules(model: nn.Module, cfg: FinetuneConfig) -> list[str]:
    """Names of the modules whose full weights train, after LoRA takes the parts it adapts."""
    names: list[str] = []
    lora_vision = cfg.lora.enabled and cfg.lora.vision
    lora_llm = cfg.lora.enabled and cfg.lora.llm
    if not lora_vision:
        if not cfg.model.freeze_vision:
            names.append(VISION)
        elif cfg.model.unfreeze_vision_layers:
            names += vision_layer_names(model, cfg.model.unfreeze_vision_layers)
    if not cfg.model.freeze_projector:
        names.append(PROJECTOR)
    if not lora_llm and not cfg.model.freeze_llm:
        names += LLM
    return names


def apply_freezing(model: nn.Module, cfg: FinetuneConfig) -> list[str]:
    """Full-weight training: set requires_grad from the config. Returns the trained module names."""
    names = fully_trained_modules(model, cfg)
    if not names:
        raise ConfigError(
            "nothing would train: model.freeze_vision, model.freeze_projector and model.freeze_llm are all "
            "true and lora.enabled is false; unfreeze a part or enable LoRA"
        )
    model.requires_grad_(False)
    for name in names:
        model.get_submodule(name).requires_grad_(True)
    return names
