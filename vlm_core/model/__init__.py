"""Model building for training: load (or build tiny), then freeze parts or add LoRA adapters."""

from __future__ import annotations

from vlm_core.config import FinetuneConfig


def build_for_training(cfg: FinetuneConfig):
    """Load the configured InternVL model and make exactly the configured parameters trainable."""
    from vlm_core.model.freeze import apply_freezing
    from vlm_core.model.load import load_model
    from vlm_core.model.lora import apply_lora

    model = load_model(cfg.model)
    if cfg.lora.enabled:
        return apply_lora(model, cfg)
    apply_freezing(model, cfg)
    return model
