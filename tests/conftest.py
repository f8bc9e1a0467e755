"""Shared fixtures: the tiny model built once per session, real image batches, a real S3 server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from vlm_core.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-internvl", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def image_tile(color: tuple[int, int, int], size: int, seed: int) -> torch.Tensor:
    """A real RGB image (a colour with noise) resized to one tile and ImageNet-normalised: (3, size, size)."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color, dtype=np.int16) + rng.integers(-20, 20, size=(size * 2, size * 3, 3)), 0, 255)
    img = Image.fromarray(arr.astype(np.uint8), "RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


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


@pytest.fixture(scope="session")
def batch(tokenizer):
    from vlm_core.model.tiny import TILE_SIZE, TOKENS_PER_TILE

    return make_batch(tokenizer, TILE_SIZE, TOKENS_PER_TILE, n_samples=3)


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """A real S3-compatible HTTP server (moto_server) on 127.0.0.1 that a test can stop and restart."""

    def __init__(self, log_path: Path, port: int | None = None):
        self.port = port or _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.time() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-Zq7", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def s3_env(endpoint: str):
    """Point s3fs / boto3 at `endpoint` with test credentials; restore the environment after."""
    env = {"AWS_ENDPOINT_URL": endpoint, **S3_ENV}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A session-wide moto_server; sets AWS_* for s3fs/boto3."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log").start()
    with s3_env(server.endpoint):
        yield server.endpoint
    server.stop()


@pytest.fixture
def own_s3_server(tmp_path):
    """A moto_server of this test alone (it may stop and restart it); AWS_* point at it."""
    import s3fs

    server = MotoServer(tmp_path / "moto.log").start()
    with s3_env(server.endpoint):
        s3fs.S3FileSystem.clear_instance_cache()
        yield server
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="session")
def prefect_server():
    """A real temporary Prefect server (SQLite) for the whole session; flows in tests report to it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def flow_run_artifacts(flow_run_id) -> dict:
    """{key: artifact} of one flow run, read back through the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return {a.key: a for a in run_coro_as_sync(read())}


def flow_run_logs(flow_run_id) -> list[str]:
    """Every log message of one flow run (and its task runs), read back through the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def read():
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    return [log.message for log in run_coro_as_sync(read())]


# --------------------------------------------------------------------------------------------------
# Data sets for the model-input tests: the same records as loose JSONL + images and as WebDataset
# shards written with plain webdataset (the shard contract of vlm_core/data/sample.py).

DEMO_COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}
DEMO_SIZES = [(64, 48), (48, 96), (120, 40), (100, 100), (30, 90)]


def jpeg_bytes(width: int, height: int, color: tuple[int, int, int], seed: int = 0) -> bytes:
    """A real JPEG: a colour with noise."""
    import io

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color, dtype=np.int16) + rng.integers(-20, 20, size=(height, width, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def demo_records(n: int, seed: int = 0) -> list[dict]:
    """n InternVL-style records cycling through text-only, one-image and two-image samples.

    Each record: {"id", "conversations", "images": [(path, jpeg bytes, width, height)]}; the reply
    names the sample number so tests can tell samples apart.
    """
    names = list(DEMO_COLORS)
    records = []
    for i in range(n):
        color = names[(i + seed) % len(names)]
        kind = i % 3
        images = []
        for k in range(kind):
            w, h = DEMO_SIZES[(i + k) % len(DEMO_SIZES)]
            images.append((f"img/{i:05d}_{k}.jpg", jpeg_bytes(w, h, DEMO_COLORS[color], seed * 1000 + i * 10 + k), w, h))
        if kind == 0:
            conv = [{"from": "human", "value": f"Say the word {i}"}, {"from": "gpt", "value": f"{i}"}]
        elif kind == 1:
            conv = [
                {"from": "human", "value": "<image>\nWhat color is the image?"},
                {"from": "gpt", "value": f"It is {color} {i}."},
            ]
        else:
            conv = [
                {"from": "system", "value": "You are a helpful assistant."},
                {"from": "human", "value": "<image> and <image>: which color?"},
                {"from": "gpt", "value": f"Both are {color}."},
                {"from": "human", "value": "Which sample?"},
                {"from": "gpt", "value": f"{i}"},
            ]
        records.append({"id": f"s{i:05d}", "conversations": conv, "images": images})
    return records


def write_jsonl_set(folder: Path, records: list[dict]) -> Path:
    """InternVL JSONL + loose image files under `folder`; returns the annotation path."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in records:
        for path, data, _, _ in r["images"]:
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(data)
        line = {"id": r["id"], "conversations": r["conversations"]}
        if r["images"]:
            line["image"] = [p for p, *_ in r["images"]] if len(r["images"]) > 1 else r["images"][0][0]
        lines.append(json.dumps(line))
    annotation = folder / "demo.jsonl"
    annotation.write_text("\n".join(lines) + "\n")
    return annotation


def write_shard_set(folder: Path, records: list[dict], per_shard: int) -> Path:
    """WebDataset tar shards (`key.json` = ShardSample, `key.imgK.jpg`) + manifest.json in `folder`."""
    import hashlib

    import webdataset as wds

    from vlm_core.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, SplitInfo
    from vlm_core.data.sample import ImageRef, ShardSample, Source, sample_key

    folder.mkdir(parents=True, exist_ok=True)
    infos = []
    for start in range(0, len(records), per_shard):
        name = f"train-{start // per_shard:06d}.tar"
        chunk = records[start : start + per_shard]
        with wds.TarWriter(str(folder / name), encoder=False) as sink:
            for line, r in enumerate(chunk, start=start + 1):
                record = ShardSample(
                    id=r["id"],
                    conversations=r["conversations"],
                    images=[ImageRef(member=f"img{k}.jpg", path=p, width=w, height=h)
                            for k, (p, _, w, h) in enumerate(r["images"])],
                    source=Source(dataset="demo", file="demo.jsonl", line=line),
                )
                sample = {"__key__": sample_key("demo", line), "json": record.model_dump_json(by_alias=True).encode()}
                sample.update({f"img{k}.jpg": data for k, (_, data, _, _) in enumerate(r["images"])})
                sink.write(sample)
        blob = (folder / name).read_bytes()
        infos.append(ShardInfo(name=name, samples=len(chunk), bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest()))
    split = SplitInfo(shards=infos, samples=len(records), bytes=sum(i.bytes for i in infos))
    (folder / MANIFEST_NAME).write_text(Manifest(fingerprint="test", train=split).model_dump_json(indent=2))
    return folder


@pytest.fixture(scope="session")
def tiny_config(tiny_model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def preprocessor(tokenizer, tiny_config):
    from vlm_core.config import DataConfig
    from vlm_core.data.preprocess import make_preprocessor

    return make_preprocessor(tokenizer, DataConfig(max_dynamic_patch=4, max_seq_length=1024), tiny_config)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    """48 records as shards (5 shards: 4 × 10 + 8) and as JSONL + images."""
    root = tmp_path_factory.mktemp("demo-data")
    records = demo_records(48)
    return {
        "records": records,
        "shards": write_shard_set(root / "shards", records, per_shard=10),
        "annotation": write_jsonl_set(root / "loose", records),
        "image_root": root / "loose",
    }
