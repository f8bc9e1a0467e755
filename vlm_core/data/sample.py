"""The record stored in a shard as `<key>.json`: the contract between shard writing and reading.

One shard sample = one tar key (no dots) with `<key>.json` (this record) and one member per image,
`<key>.img0.jpg`, `<key>.img1.png`, ... in text order. The record keeps everything needed to train
on the sample and to trace it back to its input: the original `id`, the conversation exactly as
given (LLaVA-style `from`/`value` turns with `<image>` placeholders, and any other key a turn carries,
e.g. a `weight`: kept, not used by training, so nothing of the input is silently lost), each image's
member name, original path and size, the source dataset, file and line, and the dataset's tile budget.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100  # the label of a token the loss skips (PyTorch's and transformers' convention)
Speaker = Literal["system", "human", "gpt"]  # LLaVA / InternVL `from` values
SPEAKERS: tuple[str, ...] = get_args(Speaker)
CHATML_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}  # speaker -> ChatML role
# Text a turn may not contain: the ChatML and InternVL image tokens. The tokenizer reads them as
# control tokens, so a turn holding one would end a turn early or fake an image span.
RESERVED_TOKENS = ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>")


def with_image_placeholder(turns: list[tuple[str, str]], n_images: int) -> list[tuple[str, str]]:
    """(speaker, text) turns after InternVL's rule for a missing placeholder: a sample with exactly one
    image and no `<image>` anywhere gets `<image>\\n` prepended to its first human turn. Anything else is
    returned unchanged; a placeholder/image count mismatch is the caller's to report."""
    if n_images != 1 or any(IMAGE_PLACEHOLDER in text for _, text in turns):
        return turns
    first = next((i for i, (speaker, _) in enumerate(turns) if speaker == "human"), None)
    if first is None:
        return turns
    return [*turns[:first], ("human", IMAGE_PLACEHOLDER + "\n" + turns[first][1]), *turns[first + 1 :]]


class Turn(BaseModel):
    """One conversation turn as InternVL / LLaVA annotations write it; other keys are kept as given."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    from_: Speaker = Field(alias="from", description="Speaker of the turn.")
    value: str = Field(description="Turn text; `<image>` marks where each image goes.")


class ImageRef(BaseModel):
    """An image of the sample: its member suffix in the shard and where it came from."""

    model_config = ConfigDict(extra="forbid")

    member: str = Field(description="Tar member suffix after the key, e.g. 'img0.jpg'.")
    path: str = Field(description="Image path as written in the annotation (relative to the dataset root).")
    width: int = Field(ge=1, description="Width in pixels (after EXIF orientation).")
    height: int = Field(ge=1, description="Height in pixels (after EXIF orientation).")


class Source(BaseModel):
    """Where the sample came from, for error messages and rejected.jsonl."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="Dataset name (the meta JSON key, or the LLaVA file's stem).")
    file: str = Field(description="Annotation file path or URL.")
    line: int = Field(ge=1, description="1-based line (JSONL) or record index + 1 (JSON list).")


class ShardSample(BaseModel):
    """The `<key>.json` record of one shard sample."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_version: int = Field(SCHEMA_VERSION, description="Version of this record layout.")
    id: str = Field(description="The sample's original id (or '<dataset>:<line>' when it had none).")
    conversations: list[Turn] = Field(description="The conversation, unchanged.")
    images: list[ImageRef] = Field(default_factory=list, description="Images in text order.")
    source: Source = Field(description="Origin of the sample.")
    max_dynamic_patch: int | None = Field(None, description="Per-dataset tile budget; null uses data.max_dynamic_patch.")


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(dataset: str, line: int, repeat: int = 0) -> str:
    """A tar key without dots, unique per (dataset, line, repeat) and stable across runs."""
    return f"{_UNSAFE.sub('_', dataset)}-{line:09d}-{repeat:03d}"
