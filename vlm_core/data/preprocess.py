"""One sample (conversation + image bytes) → the tensors InternVL trains on.

The glue between the shard record (`ShardSample` + image members) or a JSONL line with loose image
files, and the model: decode and tile the images, render the template with one image span per
image, truncate, and add the dummy tile a text-only sample needs. Both loaders (streaming and the
map-style reference) call the same `Preprocessor`, so they produce identical inputs. Pixels come from
data.resize_backend: `torch` (vlm_core.data.fast_tiling, the default: within 2 grey levels of PIL on
photos, several times faster) or `pil` (vlm_core.data.tiling: InternVL's pixels bit for bit); both
choose the same grid, so tile counts and token sequences never depend on the backend.

Text-only samples get one dummy tile (zeros) whose `<IMG_CONTEXT>` span sits after the
conversation with attention 0 and labels -100. Every sample then runs the vision tower, so all ranks
run the same graph: with a text-only sample on one rank and an image on another, ZeRO-2 crashes and
ZeRO-3 hangs, because the ranks run different graphs (found on CPU with gloo; InternVL trains its
text-only samples with a dummy tile for the same reason). Being last and masked, the span changes nothing the real tokens see.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vlm_core.config import DataConfig
from vlm_core.data.fast_tiling import fast_pixel_values
from vlm_core.data.sample import ShardSample, Turn
from vlm_core.data.template import (
    IGNORE_INDEX,
    SampleRejected,
    TemplateTokens,
    encode_conversation,
    prepare_turns,
    truncate,
)
from vlm_core.data.tiling import VisionGeometry, image_pixel_values, open_rgb, vision_geometry

log = logging.getLogger(__name__)


@dataclass
class ModelSample:
    """One preprocessed sample; the collator batches these."""

    input_ids: torch.Tensor  # (L,) int64
    labels: torch.Tensor  # (L,) int64, -100 where not trained
    attention_mask: torch.Tensor  # (L,) int64, 0 on the dummy tile's span
    pixel_values: torch.Tensor  # (tiles, 3, S, S) float32, in text order
    tiles_per_image: list[int]  # tiles of each kept image ([] for text-only: its dummy tile is not an image)
    sample_id: str
    truncated: bool = False

    @property
    def dummy_tile(self) -> bool:
        return not self.tiles_per_image


@dataclass(frozen=True)
class PreprocessSettings:
    """The data settings preprocessing needs (from `DataConfig`) plus the model's tile geometry."""

    geometry: VisionGeometry
    max_dynamic_patch: int = 12
    min_dynamic_patch: int = 1
    use_thumbnail: bool = True
    normalization: str = "imagenet"
    resize_backend: Literal["torch", "pil"] = "torch"
    max_seq_length: int = 4096
    system_prompt: str | None = None
    overlong: Literal["truncate", "skip"] = "truncate"

    @classmethod
    def from_config(cls, data: DataConfig, model_config: Any) -> PreprocessSettings:
        """Settings from `cfg.data` and the model's config (InternVLConfig or config.json dict)."""
        geometry = vision_geometry(model_config)
        if data.max_seq_length <= geometry.tokens_per_tile + 16:
            raise ValueError(
                f"data.max_seq_length={data.max_seq_length} cannot hold one image tile ({geometry.tokens_per_tile} "
                "tokens) and a reply; raise it"
            )
        return cls(
            geometry=geometry,
            max_dynamic_patch=data.max_dynamic_patch,
            min_dynamic_patch=data.min_dynamic_patch,
            use_thumbnail=data.use_thumbnail,
            normalization=data.normalization,
            resize_backend=data.resize_backend,
            max_seq_length=data.max_seq_length,
            system_prompt=data.system_prompt,
            overlong=data.overlong,
        )


@dataclass
class Preprocessor:
    """Turns conversations and image bytes into `ModelSample`s; picklable for DataLoader workers."""

    tokenizer: Any
    settings: PreprocessSettings

    def __post_init__(self) -> None:
        self.tokens = TemplateTokens.from_tokenizer(self.tokenizer)

    def __call__(
        self,
        turns: list[Turn],
        images: list[bytes],
        sample_id: str,
        max_dynamic_patch: int | None = None,
        where: str = "",
    ) -> ModelSample:
        """Preprocess one sample; raises `SampleRejected` (with a reason) when it cannot be trained on."""
        s = self.settings
        where = where or sample_id
        pairs = prepare_turns(turns, len(images), s.system_prompt, where)
        pixels, tiles = self._pixels(images, max_dynamic_patch, where)
        if not tiles:
            pixels = torch.zeros(1, 3, s.geometry.tile_size, s.geometry.tile_size)
        per_image = [n * s.geometry.tokens_per_tile for n in tiles]
        enc = encode_conversation(pairs, self.tokenizer, self.tokens, per_image, where)
        budget = s.max_seq_length - (0 if tiles else s.geometry.tokens_per_tile + 2)
        enc, was_cut = truncate(enc, budget, s.overlong, where)
        kept = len(enc.image_spans)
        if kept < len(tiles):
            pixels, tiles = pixels[: sum(tiles[:kept])], tiles[:kept]
            if not tiles:  # every image fell past the cut: the sample becomes text-only
                pixels = torch.zeros(1, 3, s.geometry.tile_size, s.geometry.tile_size)
        ids, labels, attention = enc.input_ids, enc.labels, [1] * len(enc.input_ids)
        if not tiles:
            span = [self.tokens.img_start_id] + [self.tokens.img_context_id] * s.geometry.tokens_per_tile
            span.append(self.tokens.img_end_id)
            ids = ids + span
            labels = labels + [IGNORE_INDEX] * len(span)
            attention = attention + [0] * len(span)
        return ModelSample(
            input_ids=torch.tensor(ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            attention_mask=torch.tensor(attention, dtype=torch.long),
            pixel_values=pixels,
            tiles_per_image=tiles,
            sample_id=sample_id,
            truncated=was_cut,
        )

    def _pixels(self, images: list[bytes], max_dynamic_patch: int | None, where: str) -> tuple[torch.Tensor, list[int]]:
        """The tiles of all images in text order, and the tile count of each (none for no image)."""
        s = self.settings
        if not images:
            return torch.zeros(0, 3, s.geometry.tile_size, s.geometry.tile_size), []
        names = [f"{where} image {k}" for k in range(len(images))]
        max_tiles = max_dynamic_patch or s.max_dynamic_patch
        try:
            if s.resize_backend == "torch":
                return fast_pixel_values(images, names, s.geometry, s.min_dynamic_patch, max_tiles, s.use_thumbnail,
                                         s.normalization)
            decoded = [open_rgb(data, name) for data, name in zip(images, names, strict=True)]
        except ValueError as exc:
            raise SampleRejected("invalid", str(exc)) from None
        return image_pixel_values(decoded, s.geometry, s.min_dynamic_patch, max_tiles, s.use_thumbnail,
                                  s.normalization)

    def generation_prompt(
        self,
        turns: list[Turn],
        images: list[bytes],
        sample_id: str,
        max_dynamic_patch: int | None = None,
        where: str = "",
    ) -> ModelSample:
        """The model input for answering the conversation's last (human) turn: the same template, tiling and
        image spans as training, ending with the generation prompt `<|im_start|>assistant\\n`; labels all -100.

        A text-only prompt gets no dummy tile: in training that tile sits after the conversation, masked,
        where no real token sees it; here the answer would come after it, so leaving it out gives the
        answer exactly the context training gave. A prompt longer than data.max_seq_length is rejected
        ("too_long"), never cut: a cut prompt would answer another question.
        """
        s = self.settings
        where = where or sample_id
        if not turns or turns[-1].from_ != "human":
            raise SampleRejected("invalid", f"{where}: a generation prompt must end with a human turn")
        placeholder_reply = Turn.model_validate({"from": "gpt", "value": "-"})  # prepare_turns wants a reply
        pairs = prepare_turns([*turns, placeholder_reply], len(images), s.system_prompt, where)[:-1]
        pixels, tiles = self._pixels(images, max_dynamic_patch, where)
        enc = encode_conversation(pairs, self.tokenizer, self.tokens, [n * s.geometry.tokens_per_tile for n in tiles],
                                  where)
        ids = enc.input_ids + list(self.tokens.prefix_ids["assistant"])
        if len(ids) > s.max_seq_length:
            raise SampleRejected("too_long", f"{where}: the prompt is {len(ids)} tokens, more than "
                                 f"data.max_seq_length={s.max_seq_length}; raise it or shorten the prompt")
        return ModelSample(
            input_ids=torch.tensor(ids, dtype=torch.long),
            labels=torch.full((len(ids),), IGNORE_INDEX, dtype=torch.long),
            attention_mask=torch.ones(len(ids), dtype=torch.long),
            pixel_values=pixels,
            tiles_per_image=tiles,
            sample_id=sample_id,
        )

    def from_shard(self, record: ShardSample, members: dict[str, bytes], where: str = "") -> ModelSample:
        """Preprocess a shard sample: its `<key>.json` record and its members by suffix (`img0.jpg`, ...)."""
        where = where or f"{record.source.file}:{record.source.line} (id {record.id})"
        images = []
        for ref in record.images:
            data = members.get(ref.member.lower())
            if data is None:
                raise SampleRejected("invalid", f"{where}: image member {ref.member!r} missing from the shard")
            images.append(data)
        return self(record.conversations, images, record.id, record.max_dynamic_patch, where)


def make_preprocessor(tokenizer: Any, data: DataConfig, model_config: Any) -> Preprocessor:
    """A `Preprocessor` for this tokenizer, `cfg.data` and model config (InternVLConfig or config.json dict)."""
    return Preprocessor(tokenizer, PreprocessSettings.from_config(data, model_config))
