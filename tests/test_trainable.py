"""Freezing and LoRA: after real optimizer steps, exactly the intended parameters changed."""

from __future__ import annotations

import pytest
import torch

from vlm_core.config import ConfigError, FinetuneConfig, load_config
from vlm_core.model import build_for_training

VISION, PROJ, LLM, HEAD = "model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head."


def _train_and_diff(cfg: FinetuneConfig, batch, steps: int = 3) -> tuple[set[str], set[str], object]:
    """Run `steps` AdamW steps; return (names of changed params, names of unchanged params, model)."""
    model = build_for_training(cfg)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    return changed, set(before) - changed, model


def _cfg(tiny_model_dir, *overrides: str) -> FinetuneConfig:
    return load_config(None, [f"model.path={tiny_model_dir}", "model.dtype=float32", "lora.dropout=0.0", *overrides])


def _under(names: set[str], *prefixes: str) -> set[str]:
    return {n for n in names if n.startswith(prefixes)}


@pytest.mark.parametrize(
    ("overrides", "trained_prefixes"),
    [
        ([], (PROJ, LLM, HEAD)),  # default: vision frozen, projector + LLM train
        (["model.freeze_vision=false"], (VISION, PROJ, LLM, HEAD)),
        (["model.freeze_llm=true"], (PROJ,)),
        (["model.freeze_llm=true", "model.freeze_projector=true", "model.unfreeze_vision_layers=1"],
         ("model.vision_tower.encoder.layer.1.",)),
        (["model.freeze_projector=true"], (LLM, HEAD)),
    ],
    ids=["default", "all", "projector-only", "last-vision-layer", "llm-only"],
)
def test_full_weight_freezing(tiny_model_dir, batch, overrides, trained_prefixes):
    changed, unchanged, model = _train_and_diff(_cfg(tiny_model_dir, *overrides), batch)
    names = changed | unchanged
    expected = _under(names, *trained_prefixes)
    assert expected, "the case must train something"
    assert changed == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


def test_lora_on_llm_trains_adapters_and_projector_only(tiny_model_dir, batch):
    changed, unchanged, model = _train_and_diff(_cfg(tiny_model_dir, "lora.enabled=true", "lora.r=4"), batch)
    lora = {n for n in changed if ".lora_A." in n or ".lora_B." in n}
    # one A and one B per adapted linear: 7 targets x 2 LLM layers
    assert len(lora) == 2 * 7 * 2
    assert all(".language_model." in n for n in lora)
    proj_copy = {n for n in changed if "multi_modal_projector.modules_to_save." in n}
    assert proj_copy and changed == lora | proj_copy
    base = {n for n in unchanged if "lora_" not in n and "modules_to_save" not in n}
    assert _under({n.removeprefix("base_model.model.") for n in base}, VISION, LLM, HEAD)
    assert model.peft_config["default"].lora_alpha == 8  # alpha defaults to 2r


def test_lora_on_vision_and_llm_with_frozen_projector(tiny_model_dir, batch):
    changed, _, model = _train_and_diff(
        _cfg(tiny_model_dir, "lora.enabled=true", "lora.vision=true", "model.freeze_projector=true",
             "lora.llm_target_modules=[q_proj,v_proj]", "lora.alpha=5"),
        batch,
    )
    assert all(".lora_A." in n or ".lora_B." in n for n in changed)
    vision = {n for n in changed if ".vision_tower." in n}
    llm = {n for n in changed if ".language_model." in n}
    assert len(vision) == 2 * 6 * 2 and len(llm) == 2 * 2 * 2  # (A,B) x targets x layers
    assert model.peft_config["default"].lora_alpha == 5


def test_lora_with_last_vision_layer_trains_it_in_full(tiny_model_dir, batch):
    changed, _, model = _train_and_diff(
        _cfg(tiny_model_dir, "lora.enabled=true", "model.freeze_projector=true", "model.unfreeze_vision_layers=1"),
        batch,
    )
    full = {n for n in changed if "modules_to_save" in n}
    assert full and all("vision_tower.encoder.layer.1.modules_to_save" in n for n in full)
    assert changed - full == {n for n in changed if ".lora_" in n and ".language_model." in n}


def test_nothing_to_train_is_an_error(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, "model.freeze_llm=true", "model.freeze_projector=true")
    with pytest.raises(ConfigError, match="nothing would train"):
        build_for_training(cfg)
    with pytest.raises(ConfigError, match="no linear layer matches"):
        build_for_training(_cfg(tiny_model_dir, "lora.enabled=true", "lora.llm_target_modules=[qkv]"))


def test_lora_starts_from_train_seed_whatever_the_process_drew_before(tiny_model_dir):
    """Two runs of one config start from the same adapters (a rerun, or every rank), another seed from others."""

    def adapters(seed_before: int, *overrides: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed_before)  # what imports and earlier work left in the generator
        torch.rand(seed_before)
        model = build_for_training(_cfg(tiny_model_dir, "lora.enabled=true", "lora.r=4", *overrides))
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}

    first, again = adapters(1), adapters(7)
    assert first and first.keys() == again.keys()
    assert all(torch.equal(first[n], again[n]) for n in first)
    other = adapters(1, "train.seed=43")
    assert not any(torch.equal(first[n], other[n]) for n in first)
