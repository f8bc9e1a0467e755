"""The merge flow with storage on a real S3 server, credentials from a Prefect Secret block, no leaks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import s3fs
import torch

from flows.merge import merge
from helpers.flow_runs import flow_run_artifacts, flow_run_logs
from helpers.servers import S3_ENV
from vlm_core.checkpoints import mark_complete
from vlm_core.config import load_config, to_json, to_yaml
from vlm_core.model import build_for_training
from vlm_core.storage import is_complete, upload_folder

pytestmark = pytest.mark.integration  # the Prefect test server, moto_server, the vlmft CLI

SECRET = S3_ENV["AWS_SECRET_ACCESS_KEY"]


def _train_adapter(tiny_model_dir, batch, out: Path) -> Path:
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "model.dtype=float32", "lora.enabled=true", "lora.r=4"])
    model = build_for_training(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.save_pretrained(out)
    mark_complete(out, 3)
    return out


def test_merge_flow_from_storage_with_secret_block(prefect_server, s3_server, tiny_model_dir, batch, tmp_path,
                                                   monkeypatch):
    from prefect.blocks.system import Secret

    fs = s3fs.S3FileSystem()
    if not fs.exists("flow-bucket"):
        fs.mkdir("flow-bucket")
    # the run's checkpoint exists only in storage (the training machine is gone)
    ckpt = _train_adapter(tiny_model_dir, batch, tmp_path / "elsewhere" / "checkpoint-3")
    # stored under its run id, {name}-{identity[:8]}; no shards here, so the one run named lora-run is found
    upload_folder(ckpt, "s3://flow-bucket/runs/lora-run-0123abcd/checkpoint-3")

    Secret(value=json.dumps({"AWS_ACCESS_KEY_ID": S3_ENV["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": SECRET}))\
        .save("s3-creds", overwrite=True)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    s3fs.S3FileSystem.clear_instance_cache()
    cfg = load_config(None, ["name=lora-run", f"model.path={tiny_model_dir}", "model.dtype=float32",
                             "lora.enabled=true", f"train.output_dir={tmp_path / 'train'}",
                             f"data.shards={tmp_path / 'no-shards'}",
                             "storage.url=s3://flow-bucket", "storage.secret_block=s3-creds"])
    state = merge(cfg, return_state=True)
    result = state.result()
    assert result["uploaded_to"] == "s3://flow-bucket/runs/lora-run-0123abcd/merged"
    assert is_complete("s3://flow-bucket/runs/lora-run-0123abcd/merged") and result["relative_diff"] <= 1e-4
    assert (tmp_path / "train" / "merged" / "model.safetensors").is_file()
    arts = flow_run_artifacts(state.state_details.flow_run_id)
    assert "s3://flow-bucket/runs/lora-run-0123abcd/merged" in arts["merged-model"].data

    # the secret never shows: not in logs, artifacts, the returned value, the config or any written file
    run_id = state.state_details.flow_run_id
    texts = flow_run_logs(run_id) + [a.data for a in arts.values()] + [json.dumps(result), to_json(cfg)]
    texts += [p.read_text(errors="ignore") for p in (tmp_path / "train").rglob("*") if p.is_file()]
    assert not [t for t in texts if SECRET in str(t)]

    again = merge(cfg)
    assert again["skipped"] is True

    # the CLI's pointer commands read the same config's Secret block (the environment has no credentials)
    import os

    from prefect.settings import PREFECT_API_URL

    (tmp_path / "run.yaml").write_text(to_yaml(cfg))
    secret_keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # the merge above put them in this process only
    env = {k: v for k, v in os.environ.items() if k not in secret_keys} | {"PREFECT_API_URL": PREFECT_API_URL.value()}
    vlmft = Path(sys.executable).parent / "vlmft"
    res = subprocess.run([vlmft, "current", "--config", tmp_path / "run.yaml"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "no current model of lora-run: nothing promoted yet" in res.stdout, res.stderr[-2000:]
    res = subprocess.run([vlmft, "current", "--config", tmp_path / "run.yaml", "storage.secret_block=no-such-block"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 2 and "vlmft: storage.secret_block=no-such-block: Unable to find block" in res.stderr, res.stderr
    assert "AWS_SECRET_ACCESS_KEY in the environment" in res.stderr and "Traceback" not in res.stderr


def test_cli_merge_without_checkpoint_says_what_to_pass(prefect_server, tiny_model_dir, tmp_path):
    from prefect.settings import PREFECT_API_URL

    vlmft = Path(sys.executable).parent / "vlmft"
    res = subprocess.run([vlmft, "merge", f"model.path={tiny_model_dir}", "lora.enabled=true",
                          f"train.output_dir={tmp_path / 'none'}"], capture_output=True, text=True,
                         env={**__import__("os").environ, "PREFECT_API_URL": PREFECT_API_URL.value()})
    assert res.returncode == 2 and "no complete checkpoint in train.output_dir" in res.stderr
    assert "--adapter" in res.stderr
