"""Reject, at shard-preparation time, samples that training could never use whole.

A sample's length is its text tokens plus, per image, tokens-per-tile × tiles, where the tiles
come from the image size and the tile budget exactly as training computes them (vlm_core.data.tiling
and template). If truncation to data.max_seq_length would cut inside an image span, or leave no
assistant token (or data.overlong is 'skip'), the sample goes to rejected.jsonl as `too_long`
instead of surfacing as a zero loss in the middle of training (upstream InternVL issue #461).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vlm_core.config import DataConfig, ModelConfig
from vlm_core.data.sample import Turn
from vlm_core.data.template import (
    SampleRejected,
    TemplateTokens,
    encode_conversation,
    prepare_turns,
    truncate,
)
from vlm_core.data.tiling import num_tiles, tile_budget, vision_geometry
from vlm_core.data.validate import LengthCheck


def model_fingerprint(model: ModelConfig) -> str:
    """What of the model shapes sample lengths: its tokenizer files and config.json."""
    from vlm_core.model.load import resolve_model_path

    folder = resolve_model_path(model)
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            h.update(name.encode() + (folder / name).read_bytes())
    return h.hexdigest()


def make_length_check(model: ModelConfig, data: DataConfig) -> LengthCheck:
    from vlm_core.model.load import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(model)
    config = json.loads((Path(resolve_model_path(model)) / "config.json").read_text())
    geometry = vision_geometry(config)
    tokens = TemplateTokens.from_tokenizer(tokenizer)

    def check(turns: list[dict], sizes: list[tuple[int, int]], max_patch: int | None) -> str | None:
        budget = tile_budget(max_patch or data.max_dynamic_patch, len(sizes))
        low = min(data.min_dynamic_patch, budget)
        per_image = [geometry.tokens_per_tile * num_tiles(w, h, geometry.tile_size, low, budget, data.use_thumbnail)
                     for w, h in sizes]
        pairs = prepare_turns([Turn.model_validate(t) for t in turns], len(sizes), data.system_prompt, "sample")
        try:
            enc = encode_conversation(pairs, tokenizer, tokens, per_image, "sample")
            # text-only samples carry one dummy tile span at training time
            room = data.max_seq_length - (0 if sizes else geometry.tokens_per_tile + 2)
            truncate(enc, room, data.overlong, "sample")
        except SampleRejected as exc:
            return str(exc).removeprefix("sample: ")
        return None

    return check
