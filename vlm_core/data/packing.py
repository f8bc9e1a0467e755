"""Multimodal packing: a micro-batch's samples in as few rows as a token and a tile budget allow.

Why: a micro-batch mixes text-only, one-image and multi-image samples of very different lengths,
and padding every sample to the longest wastes most of the compute of a mixed batch. Packing puts
several samples end to end in one row instead, so only each row's tail is padding.

What keeps packing exact, so that a packed run learns what the unpacked one would:

* `position_ids` restart at 0 for every sample. The batch has no `attention_mask` and says
  `use_cache=False`: transformers derives a block-causal mask from the position ids
  (`find_packed_sequence_indices` in transformers' masking_utils, for sdpa and eager) only when there
  is neither a 2D mask nor a cache, and the language model's config has `use_cache=True`, which would
  build an empty cache even in training and silently let samples attend to each other.
  Flash-attention-2 takes the same position ids as variable-length sequences. So no token attends
  to another sample's (tests/test_packing.py compares each sample's logits alone and packed). The
  dummy tile of a text-only sample sits at that sample's end, so no real token of it attends to the
  span either, exactly as with its attention 0 when unpacked.
* Each sample's first label is -100: the last token of the sample before it would otherwise be
  trained to predict it (unpacked, a sample's first label is never a target).
* `sample_index` (rows, width) names, for every token, the sample of the micro-batch it belongs to
  (-1 on padding), so the `sample` and `square` loss reductions count supervised tokens per sample,
  not per row (vlm_core.model.loss).
* Image tiles are concatenated in the order the samples appear in the rows (row by row), which is
  the order in which InternVL fills the flattened `<IMG_CONTEXT>` positions with image features.

A micro-batch keeps `train.per_device_batch_size` samples, so the number of steps, what each step
trains on and the loader's resume position are those of an unpacked run; only the layout changes.
Within the micro-batch (the look-ahead buffer), samples are spread, longest first, over as few and
as evenly filled rows as the budgets allow (`pack_samples`); each row keeps its samples in their
original order: deterministic, a function of the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from vlm_core.data.preprocess import ModelSample
from vlm_core.data.sample import IGNORE_INDEX


def sample_tiles(sample: ModelSample) -> int:
    """Tiles a sample brings to its row: its images' tiles, or the one dummy tile of a text-only sample."""
    return int(sample.pixel_values.shape[0])


def check_fits(sample: ModelSample, max_tiles: int, where: str = "") -> None:
    """Raise ValueError naming the sample and the setting to raise when its tiles alone exceed a row's.

    Tokens need no check: a row's token budget grows to the micro-batch's longest sample (`pack_samples`)."""
    tiles = sample_tiles(sample)
    if tiles > max_tiles:
        raise ValueError(f"{where or 'sample'} (id {sample.sample_id}) has {tiles} image tiles, more than a packed "
                         f"row holds: raise train.pack_max_tiles (now {max_tiles}) to at least {tiles}")


def pack_samples(samples: Sequence[ModelSample], max_tokens: int, max_tiles: int) -> list[list[int]]:
    """Rows of indices into `samples`: each row's tokens <= the token budget and tiles <= max_tiles.

    The token budget is max_tokens, or the micro-batch's longest sample where that is longer: the
    batch is at least that wide anyway, so a long sample takes a row of its own length (shorter ones
    may join it) instead of stopping the run. This lets rows be kept short on purpose, for sdpa and
    eager attention, whose block mask is dense: a row of L tokens costs L x L attention scores
    whatever samples it holds (flash-attention-2 computes each sample's own block only).
    As few rows as the budgets allow, as even as possible: rows are padded to the longest one, so
    filling one row to the brim and leaving a short one would pad the short one. Starting from the
    fewest rows the totals need, each sample, longest first, goes to the row with the fewest tokens
    that still has room for it (tokens and tiles), or to a new row when none has. Each row lists its
    samples in their original order, and rows are ordered by their first sample. Every sample is in
    exactly one row; a sample whose tiles alone exceed max_tiles raises ValueError (never dropped).
    """
    for s in samples:
        check_fits(s, max_tiles)
    tokens = [len(s.input_ids) for s in samples]
    tiles = [sample_tiles(s) for s in samples]
    max_tokens = max([max_tokens, *tokens])
    n_rows = max(1, -(-sum(tokens) // max_tokens), -(-sum(tiles) // max_tiles)) if samples else 0
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    used = [[0, 0] for _ in range(n_rows)]  # (tokens, tiles) per row
    for i in sorted(range(len(samples)), key=lambda i: (-tokens[i], i)):
        room = [r for r in range(len(rows)) if used[r][0] + tokens[i] <= max_tokens and used[r][1] + tiles[i] <= max_tiles]
        if not room:
            rows.append([])
            used.append([0, 0])
            room = [len(rows) - 1]
        r = min(room, key=lambda r: (used[r][0], r))
        rows[r].append(i)
        used[r][0] += tokens[i]
        used[r][1] += tiles[i]
    return sorted(sorted(row) for row in rows if row)


def iter_packs(samples: Iterable[ModelSample], max_tokens: int, max_tiles: int,
               buffer: int = 16) -> Iterator[list[ModelSample]]:
    """Packs (lists of samples, one per row) of a stream of preprocessed samples, `buffer` samples at a time.

    What the training loader does per micro-batch (buffer = train.per_device_batch_size), for scripts that
    hold preprocessed samples, e.g. a GPU benchmark: `collate_packed(pack, ...)` makes one row of each.
    """
    chunk: list[ModelSample] = []
    for s in samples:
        chunk.append(s)
        if len(chunk) == buffer:
            yield from ([chunk[i] for i in row] for row in pack_samples(chunk, max_tokens, max_tiles))
            chunk = []
    if chunk:
        yield from ([chunk[i] for i in row] for row in pack_samples(chunk, max_tokens, max_tiles))


def collate_packed(samples: list[ModelSample], pad_token_id: int, max_tokens: int, max_tiles: int,
                   pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """A packed batch of `samples`: input_ids, labels, position_ids, sample_index (rows, width);
    pixel_values (tiles in row order); sample_ids (in the order given, which sample_index refers to).

    No attention_mask and use_cache=False, on purpose: the block-causal mask comes from the position ids
    (module docstring).
    Padding at a row's end gets positions 0, 1, ... (a segment of its own), labels -100, sample_index -1.
    """
    if not samples:
        raise ValueError("collate_packed: empty batch")
    rows = pack_samples(samples, max_tokens, max_tiles)
    width = max(sum(len(samples[i].input_ids) for i in row) for row in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n = len(rows)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    sample_index = torch.full((n, width), -1, dtype=torch.long)
    pixels = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            s = samples[i]
            length = len(s.input_ids)
            input_ids[r, at : at + length] = s.input_ids
            labels[r, at : at + length] = s.labels
            labels[r, at] = IGNORE_INDEX  # never a target of the previous sample's last token
            position_ids[r, at : at + length] = torch.arange(length)
            sample_index[r, at : at + length] = i
            pixels.append(s.pixel_values)
            at += length
        position_ids[r, at:] = torch.arange(width - at)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "pixel_values": torch.cat(pixels, dim=0),
        "use_cache": False,
        "sample_index": sample_index,
        "sample_ids": [s.sample_id for s in samples],
    }
