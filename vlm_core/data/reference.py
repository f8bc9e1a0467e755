"""Map-style reference loader: a JSONL annotation file + loose image files, as InternVL reads them.

InternVL's own fine-tuning reads each annotation line and opens each image file on demand
(`LazySupervisedDataset`). This module does the same, through the same `Preprocessor` and `Collator`
as the streaming loader, so the two produce identical model inputs: it is the baseline the loader
benchmark compares against, and the small-data option (no shard preparation step; images may live
on local disk or any fsspec URL, one request per image).

A sample that cannot be trained on is replaced by the next index (as upstream replaces it by a
random one) and logged with its file and line, so the DataLoader's length stays exact.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import fsspec
from torch.utils.data import DataLoader, Dataset

from vlm_core.data.preprocess import ModelSample, Preprocessor
from vlm_core.data.sample import Turn
from vlm_core.data.template import SampleRejected

log = logging.getLogger(__name__)


class ReferenceDataset(Dataset):
    """InternVL JSONL lines ({id, image: path | [paths] | absent, conversations}) + images under image_root.

    annotation and image_root are paths or fsspec URLs. max_dynamic_patch: the dataset's tile budget
    (the meta JSON's value); None uses the preprocessor's.
    """

    def __init__(
        self, annotation: str, image_root: str, preprocess: Preprocessor, max_dynamic_patch: int | None = None
    ):
        self.annotation, self.image_root = annotation, image_root.rstrip("/")
        self.preprocess, self.max_dynamic_patch = preprocess, max_dynamic_patch
        with fsspec.open(annotation, "r", encoding="utf-8") as f:
            self.lines = [line for line in f.read().splitlines() if line.strip()]  # raw, parsed on demand
        if not self.lines:
            raise ValueError(f"{annotation}: no annotation lines")
        self._fs: Any = None

    def __len__(self) -> int:
        return len(self.lines)

    def _read_image(self, path: str) -> bytes:
        if self._fs is None:  # per process: DataLoader workers build their own client
            self._fs, self._root = fsspec.core.url_to_fs(self.image_root)
        return self._fs.cat_file(f"{self._root}/{path}")

    def _load(self, index: int) -> ModelSample:
        where = f"{self.annotation}:{index + 1}"
        try:
            record = json.loads(self.lines[index])
            turns = [Turn.model_validate(t) for t in record["conversations"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise SampleRejected("invalid", f"{where}: bad annotation line ({exc})") from None
        paths = record.get("image") or []
        paths = [paths] if isinstance(paths, str) else list(paths)
        try:
            images = [self._read_image(p) for p in paths]
        except OSError as exc:
            raise SampleRejected("invalid", f"{where}: cannot read image ({exc})") from None
        sample_id = str(record.get("id", f"{self.annotation}:{index + 1}"))
        return self.preprocess(turns, images, sample_id, self.max_dynamic_patch, where)

    def __getitem__(self, index: int) -> ModelSample:
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            try:
                return self._load(i)
            except SampleRejected as exc:
                log.warning("sample skipped (%s), using the next one instead: %s", exc.reason, exc)
        raise RuntimeError(f"{self.annotation}: every sample was rejected (see the warnings above)")


def reference_dataloader(
    dataset: ReferenceDataset, collate: Any, batch_size: int, num_workers: int = 2, seed: int = 0
) -> DataLoader:
    """A shuffled DataLoader over the reference dataset (a seeded generator: same seed, same order)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=collate,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
    )
