"""The tiny random InternVL: deterministic, loadable with plain transformers, trains on real images."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoTokenizer, InternVLForConditionalGeneration

from vlm_core.model.tiny import SPECIAL_TOKENS, TILE_SIZE, TOKENS_PER_TILE, build_tiny_model


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    a, b, c = (load_file(d / "model.safetensors") for d in (tiny_model_dir, again, other))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _sha(tiny_model_dir / "model.safetensors") == _sha(again / "model.safetensors")
    assert _sha(tiny_model_dir / "tokenizer.json") == _sha(again / "tokenizer.json")
    random = [k for k in a if a[k].unique().numel() > 1]  # norms, biases start at constants
    assert len(random) > 20 and all(not torch.equal(a[k], c[k]) for k in random)


def test_folder_is_a_plain_transformers_checkpoint(tiny_model_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert isinstance(model, InternVLForConditionalGeneration)
    cfg = model.config
    assert cfg.model_type == "internvl"
    # tokens per tile follow from the config: (tile / patch)^2 * downsample^2
    vc = cfg.vision_config
    assert (vc.image_size[0] // vc.patch_size[0]) ** 2 * cfg.downsample_ratio**2 == cfg.image_seq_length == TOKENS_PER_TILE
    pre = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": TILE_SIZE, "width": TILE_SIZE} and pre["crop_to_patches"] is True
    assert json.loads((tiny_model_dir / "processor_config.json").read_text())["processor_class"] == "InternVLProcessor"


def test_tokenizer_has_special_tokens_and_chat_template(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for t in SPECIAL_TOKENS:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t, t
    assert tok.context_image_token == "<IMG_CONTEXT>" and tok.start_image_token == "<img>"
    assert tok.context_image_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = tok.apply_chat_template(
        [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "What color?"},
         {"role": "assistant", "content": "It is red."}],
        tokenize=False,
    )
    assert text == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat color?<|im_end|>\n"
        "<|im_start|>assistant\nIt is red.<|im_end|>\n"
    )
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_forward_backward_with_pixel_values_and_labels(tiny_model_dir, batch):
    model = InternVLForConditionalGeneration.from_pretrained(tiny_model_dir)
    n_ctx = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert n_ctx == batch["pixel_values"].shape[0] * TOKENS_PER_TILE
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for n, g in grads.items())
    # the image features reach the loss: vision and projector weights receive gradient
    assert grads["model.vision_tower.encoder.layer.0.attention.q_proj.weight"].abs().sum() > 0
    assert grads["model.multi_modal_projector.linear_1.weight"].abs().sum() > 0


def test_mismatched_image_tokens_fail_loudly(tiny_model_dir, batch):
    model = InternVLForConditionalGeneration.from_pretrained(tiny_model_dir)
    broken = dict(batch, pixel_values=batch["pixel_values"][:-1])
    with pytest.raises(ValueError):
        model(**broken)
