"""`manifest.json`, written last next to the shards: what a complete shard set contains.

Readers use it for the shard list and the number of samples per epoch (the Trainer needs a length
to schedule); the prepare step uses its fingerprint to skip work when nothing changed; every shard's
sha256 lets anyone check the files. A shard folder without a manifest is incomplete.
"""

from __future__ import annotations

import json

import fsspec
from pydantic import BaseModel, ConfigDict, Field

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="File name of the tar shard, relative to the manifest's folder.")
    samples: int = Field(ge=0, description="Samples in the shard.")
    bytes: int = Field(ge=0, description="Size of the shard file in bytes.")
    sha256: str = Field(description="sha256 of the shard file.")


class SplitInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shards: list[ShardInfo] = Field(default_factory=list, description="Shards of this split, in order.")
    samples: int = Field(0, ge=0, description="Samples in all shards of the split.")
    bytes: int = Field(0, ge=0, description="Bytes in all shards of the split.")


class DatasetCounts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lines: int = Field(0, ge=0, description="Records in the annotation file (blank lines not counted).")
    selected: int = Field(0, ge=0, description="Records used after repeat_time < 1 keeps the first part.")
    train: int = Field(0, ge=0, description="Samples written to the train split (repeat_time copies counted).")
    eval: int = Field(0, ge=0, description="Samples written to the eval split (never repeated).")
    rejected: int = Field(0, ge=0, description="Records rejected (each listed once in rejected.jsonl).")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = Field(MANIFEST_VERSION, description="Version of the manifest layout.")
    fingerprint: str = Field(description="sha256 over input contents and the settings that shape the shards.")
    train: SplitInfo = Field(default_factory=SplitInfo, description="Training shards.")
    eval: SplitInfo = Field(default_factory=SplitInfo, description="Held-out evaluation shards.")
    datasets: dict[str, DatasetCounts] = Field(default_factory=dict, description="Counts per input dataset.")
    rejected_by_reason: dict[str, int] = Field(default_factory=dict, description="Rejected samples per reason.")
    settings: dict = Field(default_factory=dict, description="The settings that shaped the shards.")
    warnings: list[str] = Field(default_factory=list, description="Notes on the inputs and settings that are not "
                                "errors (e.g. an eval split that takes most of the data), one line each.")

    def shard_urls(self, folder: str, split: str = "train") -> list[str]:
        """Full URLs (or paths) of a split's shards, given the folder the manifest lives in."""
        info: SplitInfo = getattr(self, split)
        return [f"{folder.rstrip('/')}/{s.name}" for s in info.shards]


def read_manifest(folder: str) -> Manifest | None:
    """The manifest in `folder` (path or fsspec URL), or None when there is none (incomplete set)."""
    url = f"{folder.rstrip('/')}/{MANIFEST_NAME}"
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return Manifest.model_validate(json.load(f))
