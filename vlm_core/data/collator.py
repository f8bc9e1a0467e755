"""Batch `ModelSample`s into the tensors `InternVLForConditionalGeneration` takes.

Right-padding to the longest sample (optionally rounded up to a multiple of 8 for GPU kernels),
labels padded with -100, attention 0 on padding, and all tiles of all samples concatenated in text
order, which is how transformers' InternVL matches image features to `<IMG_CONTEXT>` positions.
The batch also carries the sample ids, which the training logs need but the model does not take;
`model_inputs` picks the model's keys. With packing (`train.packing`), the collator packs the
micro-batch's samples into rows instead (vlm_core.data.packing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlm_core.data.packing import collate_packed
from vlm_core.data.preprocess import ModelSample
from vlm_core.data.sample import IGNORE_INDEX

MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "labels", "pixel_values", "use_cache")


@dataclass(frozen=True)
class Collator:
    """Callable collate function; a dataclass so DataLoader workers can pickle it."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    pack_max_tokens: int | None = None  # with pack_max_tiles: pack the samples into rows (train.packing)
    pack_max_tiles: int | None = None

    def __call__(self, samples: list[ModelSample]) -> dict[str, Any]:
        if self.pack_max_tokens is not None and self.pack_max_tiles is not None:
            return collate_packed(samples, self.pad_token_id, self.pack_max_tokens, self.pack_max_tiles,
                                  self.pad_to_multiple_of)
        return collate(samples, self.pad_token_id, self.pad_to_multiple_of)


def collate(samples: list[ModelSample], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """A right-padded batch: input_ids, attention_mask, labels (B, L); pixel_values (tiles, 3, S, S); sample_ids."""
    if not samples:
        raise ValueError("collate: empty batch")
    width = max(len(s.input_ids) for s in samples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n = len(samples)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(samples):
        length = len(s.input_ids)
        input_ids[i, :length] = s.input_ids
        labels[i, :length] = s.labels
        attention[i, :length] = s.attention_mask
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "pixel_values": torch.cat([s.pixel_values for s in samples], dim=0),
        "sample_ids": [s.sample_id for s in samples],
    }


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys `InternVLForConditionalGeneration.forward` takes (a packed batch has position_ids and
    use_cache=False, and no attention_mask); the rest is for the logs and the loss."""
    return {k: batch[k] for k in MODEL_KEYS if k in batch}
