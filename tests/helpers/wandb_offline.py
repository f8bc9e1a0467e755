"""The run config of an offline W&B run, read from its `run-*.wandb` file.

An offline run keeps everything (config, history) only in that file; wandb 0.31 writes no
`config.yaml` for it and ships no Python reader (its Go core reads it for `wandb sync`). The file is
a LevelDB-style log: a 7-byte header (`:W&B`, magic, version), then 32 KiB blocks of chunks, each
with a 7-byte header (CRC, length, type: full, first, middle, last) holding parts of one serialised
`wandb_internal_pb2.Record`. The records are decoded with W&B's own protobuf classes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator:
    """Every record of a `.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            yield wandb_internal_pb2.Record.FromString(parts)
            parts = b""


def run_config(run_folder: Path) -> dict:
    """{key: value} of an offline run's config: the run record's, then every config update, in order."""
    [file] = run_folder.glob("run-*.wandb")
    config: dict = {}
    for record in records(file):
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        for item in items:
            config[item.key] = json.loads(item.value_json)
    return config
