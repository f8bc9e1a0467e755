"""Model building for training: load (or build tiny), then freeze parts or add LoRA adapters."""

from __future__ import annotations

from pathlib import Path

from vlm_core.config import FinetuneConfig


def build_for_training(cfg: FinetuneConfig, weights_from: Path | None = None):
    """Load the configured InternVL model and make exactly the configured parameters trainable.

    weights_from: a full-weight checkpoint folder whose weights replace the base model's (resume).
    New weights (LoRA's A matrices) come from train.seed, whatever the process drew before: the same
    run config gives the same start on every rank and in every rerun. (The Trainer seeds only after
    the model is built, and the process's own torch seed differs from start to start here.)
    """
    import torch

    from vlm_core.model.freeze import apply_freezing
    from vlm_core.model.load import load_model
    from vlm_core.model.lora import apply_lora

    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model if weights_from is None else cfg.model.model_copy(update={"path": str(weights_from)}))
    if cfg.lora.enabled:
        return apply_lora(model, cfg)
    apply_freezing(model, cfg)
    return model
