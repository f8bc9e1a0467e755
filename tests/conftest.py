"""Shared fixtures: the tiny model built once per session, real image batches, a real S3 server, a
Prefect test server. Importable helpers live in tests/helpers/."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from helpers.batches import make_batch
from helpers.servers import MotoServer, s3_env
from helpers.shard_sets import demo_records, write_jsonl_set, write_shard_set

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from vlm_core.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-internvl", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def batch(tokenizer):
    from vlm_core.model.tiny import TILE_SIZE, TOKENS_PER_TILE

    return make_batch(tokenizer, TILE_SIZE, TOKENS_PER_TILE, n_samples=3)


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


@pytest.fixture
def console(capfd, monkeypatch):
    """capfd, with Prefect's console handler writing to the stderr it captures: Prefect binds the stream
    when it sets up logging, and capfd's stream of the test's call is not yet there when fixtures are
    set up, so the test calls `console.bind()` first. Bound back to the real stderr after."""
    from prefect.logging.configuration import setup_logging

    capfd.bind = lambda: setup_logging(incremental=False)
    yield capfd
    with monkeypatch.context() as m:
        m.setattr(sys, "stderr", sys.__stderr__)
        setup_logging(incremental=False)
