"""Tiny-model batches built by hand (not by the project's preprocessor): one-image conversations with
labels on the replies only, and a small Dataset + collate function for plain HF Trainer runs."""

from __future__ import annotations

import torch

from helpers.images import image_tile


def make_batch(tokenizer, tile_size: int, tokens_per_tile: int, n_samples: int = 2, seed: int = 0) -> dict:
    """A right-padded batch of one-image conversations, labels on the assistant reply + <|im_end|> only."""
    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}
    names = list(colors)
    ids, labels, tiles = [], [], []
    for i in range(n_samples):
        name = names[(i + seed) % len(names)]
        n_tiles = 1 + (i % 2)
        image = "<img>" + "<IMG_CONTEXT>" * (tokens_per_tile * n_tiles) + "</img>"
        prompt = f"<|im_start|>user\n{image}\nWhat color is the image?<|im_end|>\n<|im_start|>assistant\n"
        reply = f"It is {name}.<|im_end|>"
        p_ids = tokenizer.encode(prompt, add_special_tokens=False)
        r_ids = tokenizer.encode(reply, add_special_tokens=False)
        nl = tokenizer.encode("\n", add_special_tokens=False)
        ids.append(p_ids + r_ids + nl)
        labels.append([-100] * len(p_ids) + r_ids + [-100] * len(nl))
        tiles += [image_tile(colors[name], tile_size, seed * 100 + i * 10 + t) for t in range(n_tiles)]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
        "pixel_values": torch.stack(tiles),
    }


class TinySamples(torch.utils.data.Dataset):
    """n one-image samples (see make_batch) for plain HF Trainer runs of the tiny model."""

    def __init__(self, tokenizer, n: int = 8):
        from vlm_core.model.tiny import TILE_SIZE, TOKENS_PER_TILE

        self.items = []
        for i in range(n):
            b = make_batch(tokenizer, TILE_SIZE, TOKENS_PER_TILE, n_samples=1, seed=i)
            self.items.append({k: v[0] if k != "pixel_values" else v for k, v in b.items()})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def pad_collate(items: list[dict]) -> dict:
    """Right-pad TinySamples items; tiles of all samples concatenated in order."""
    width = max(len(x["input_ids"]) for x in items)

    def pad(t, v):
        return torch.cat([t, torch.full((width - len(t),), v, dtype=t.dtype)])

    return {"input_ids": torch.stack([pad(x["input_ids"], 0) for x in items]),
            "attention_mask": torch.stack([pad(x["attention_mask"], 0) for x in items]),
            "labels": torch.stack([pad(x["labels"], -100) for x in items]),
            "pixel_values": torch.cat([x["pixel_values"] for x in items])}
