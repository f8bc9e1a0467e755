"""Collator: padding, tiles in text order, supervised counts; the tiny model runs on a collated batch."""

from __future__ import annotations

import pytest
import torch

from helpers.images import jpeg_bytes
from vlm_core.data.collator import Collator, model_inputs
from vlm_core.data.sample import IGNORE_INDEX, Turn
from vlm_core.model.loss import token_weights, vlm_loss


def turns(*pairs):
    return [Turn.model_validate({"from": f, "value": v}) for f, v in pairs]


@pytest.fixture(scope="module")
def samples(preprocessor):
    red, blue, green = (220, 20, 20), (20, 20, 220), (20, 200, 20)
    return [
        preprocessor(turns(("human", "<image>\nColor?"), ("gpt", "red")), [jpeg_bytes(200, 100, red)], "one"),
        preprocessor(turns(("human", "Say yes"), ("gpt", "yes"), ("human", "again"), ("gpt", "yes")), [], "text"),
        preprocessor(turns(("human", "<image> <image>"), ("gpt", "blue and green")),
                     [jpeg_bytes(64, 64, blue), jpeg_bytes(50, 150, green)], "two"),
    ]


def test_padding_and_pixel_order(samples, tokenizer):
    batch = Collator(tokenizer.pad_token_id, pad_to_multiple_of=8)(samples)
    longest = max(len(s.input_ids) for s in samples)
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and longest <= width < longest + 8
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        assert torch.equal(batch["input_ids"][i, :n], s.input_ids)
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all() and not batch["attention_mask"][i, n:].any()
        assert torch.equal(batch["attention_mask"][i, :n], s.attention_mask)
    assert torch.equal(batch["pixel_values"], torch.cat([s.pixel_values for s in samples]))
    # tiles in text order: red image tiles, the dummy tile (zeros), blue then green
    tiles = [s.pixel_values.shape[0] for s in samples]
    assert batch["pixel_values"].shape[0] == sum(tiles) and tiles[1] == 1
    means = batch["pixel_values"].mean(dim=(2, 3))  # (tiles, 3) per-channel means
    assert means[0, 0] > means[0, 2]  # red
    assert torch.equal(batch["pixel_values"][tiles[0]], torch.zeros_like(batch["pixel_values"][0]))  # dummy
    two = means[tiles[0] + 1 :]
    blue_tiles = samples[2].tiles_per_image[0]
    assert (two[:blue_tiles, 2] > two[:blue_tiles, 1]).all() and (two[blue_tiles:, 1] > two[blue_tiles:, 2]).all()
    assert batch["sample_ids"] == ["one", "text", "two"]
    no_pad = Collator(tokenizer.pad_token_id)(samples)
    assert no_pad["input_ids"].shape[1] == longest


def test_supervised_counts_match_the_loss_weights(samples, tokenizer):
    batch = Collator(tokenizer.pad_token_id, 8)(samples)
    expected = [int((s.labels[1:] != IGNORE_INDEX).sum()) for s in samples]
    assert min(expected) > 0
    counts = (token_weights(batch["labels"], "token") > 0).sum(dim=1)
    assert counts.tolist() == expected


def test_tiny_model_forward_and_backward_on_a_collated_batch(samples, tokenizer, tiny_model_dir):
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(tiny_model_dir)
    batch = Collator(tokenizer.pad_token_id, 8)(samples)
    out = model(**model_inputs(batch))  # raises if image tokens and features disagree
    loss = vlm_loss(out.logits, batch["labels"], "square")
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    vision_grad = sum(p.grad.abs().sum() for p in model.model.vision_tower.parameters() if p.grad is not None)
    assert vision_grad > 0
