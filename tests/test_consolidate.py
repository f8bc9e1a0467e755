"""Full-weight ZeRO-3 checkpoints → safetensors: a real HF Trainer + DeepSpeed ZeRO-3 run (subprocess),
consolidated with DeepSpeed's zero_to_fp32 reader, loadable with plain transformers, verified, idempotent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoTokenizer, InternVLForConditionalGeneration

from vlm_core.checkpoints import COMPLETE_MARKER
from vlm_core.config import DataConfig, ModelConfig
from vlm_core.consolidate import CheckpointError, consolidate_checkpoint
from vlm_core.publish import MERGE_INFO

SCRIPT = Path(__file__).parent / "scripts" / "train_zero3.py"
# Torch AdamW (no "optimizer" section: DeepSpeed's would JIT-compile), fp32, and no 16-bit gathering on
# save, so the checkpoint holds no model weights at all: only the partitioned ZeRO-3 shards.
ZERO3 = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": False}, "fp16": {"enabled": False},
    "steps_per_print": 1000000,
    "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                          "stage3_gather_16bit_weights_on_model_save": False},
}

DATA = DataConfig(max_dynamic_patch=2)  # the training run's data settings (the tiny base model says 6)


@pytest.fixture(scope="module")
def zero3_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A real single-process HF Trainer + DeepSpeed ZeRO-3 run of 3 steps that saves checkpoint-3."""
    root = tmp_path_factory.mktemp("zero3")
    ds_config = root / "ds_z3.json"
    ds_config.write_text(json.dumps(ZERO3))
    out = root / "train"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, str(SCRIPT), str(tiny_model_dir), str(out), str(ds_config), "3", "3"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "ZERO_STAGE 3 STEPS 3" in res.stdout
    return out


def _mc(tiny_model_dir) -> ModelConfig:
    return ModelConfig(path=str(tiny_model_dir), dtype="float32")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return InternVLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).state_dict()


@pytest.mark.integration
def test_zero3_checkpoint_becomes_a_plain_transformers_model(zero3_run, tiny_model_dir, tmp_path):
    ckpt = zero3_run / "checkpoint-3"
    assert (ckpt / "latest").read_text().strip() == "global_step3" and (ckpt / "zero_to_fp32.py").is_file()
    assert (ckpt / COMPLETE_MARKER).is_file()
    assert not list(ckpt.glob("*.safetensors"))  # ZeRO-3 without gathering: the weights live in the shards only

    out = tmp_path / "merged"
    report = consolidate_checkpoint(ckpt, _mc(tiny_model_dir), out, data=DATA)
    assert not report.skipped and report.source == "zero" and report.dtype == "float32"
    assert report.max_abs_diff == 0.0

    model = AutoModelForImageTextToText.from_pretrained(out)  # plain transformers, no project code
    assert isinstance(model, InternVLForConditionalGeneration)
    got, trained, base = model.state_dict(), _weights(zero3_run / "final"), _weights(tiny_model_dir)
    assert got.keys() == trained.keys()
    assert all(torch.equal(got[k], trained[k]) for k in trained)
    assert any(not torch.equal(got[k], base[k]) for k in base)  # training really changed the weights
    ref = torch.load(zero3_run / "final_logits.pt")
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in ref["batch"].items() if k != "labels"}).logits
    assert (logits - ref["logits"]).abs().max().item() < 1e-5

    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "preprocessor_config.json", MERGE_INFO} <= names
    assert not names & {"latest", "trainer_state.json", "zero_to_fp32.py", "global_step3"}
    assert AutoTokenizer.from_pretrained(out).context_image_token == "<IMG_CONTEXT>"
    assert not list(tmp_path.glob("merged.tmp-*"))

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = consolidate_checkpoint(ckpt, _mc(tiny_model_dir), out, data=DATA)
    assert again.skipped and again.fingerprint == report.fingerprint
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.integration
def test_checkpoint_with_full_weights_is_resaved_and_partial_weights_refused(zero3_run, tiny_model_dir, tmp_path):
    # A checkpoint that already holds full weights (ZeRO-1/2 or no DeepSpeed): no shards needed.
    full = tmp_path / "checkpoint-3"
    shutil.copytree(zero3_run / "checkpoint-3", full, ignore=shutil.ignore_patterns("global_step*", "latest"))
    shutil.copy2(zero3_run / "final" / "model.safetensors", full / "model.safetensors")
    report = consolidate_checkpoint(full, _mc(tiny_model_dir), tmp_path / "out", data=DATA)
    assert report.source == "safetensors" and not report.skipped
    trained, got = _weights(zero3_run / "final"), _weights(tmp_path / "out")
    assert all(torch.equal(got[k], trained[k]) for k in trained)

    # Partial weights and no shards: refuse rather than let from_pretrained fill the gap with random values.
    weights = load_file(full / "model.safetensors")
    dropped = next(k for k in weights if "lm_head" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, full / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"checkpoint-3: model.safetensors is partial .*no DeepSpeed ZeRO"):
        consolidate_checkpoint(full, _mc(tiny_model_dir), tmp_path / "out2", data=DATA)
    assert not (tmp_path / "out2").exists()


def test_lora_and_empty_folders_get_a_clear_error(tiny_model_dir, tmp_path):
    lora = tmp_path / "lora-checkpoint-4"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"lora-checkpoint-4 is a LoRA checkpoint .*merge_lora"):
        consolidate_checkpoint(lora, _mc(tiny_model_dir), tmp_path / "a", data=DATA)
    empty = tmp_path / "empty-checkpoint"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty-checkpoint: no model.safetensors and no DeepSpeed ZeRO shards"):
        consolidate_checkpoint(empty, _mc(tiny_model_dir), tmp_path / "b", data=DATA)
    with pytest.raises(CheckpointError, match="no such folder"):
        consolidate_checkpoint(tmp_path / "missing", _mc(tiny_model_dir), tmp_path / "c", data=DATA)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.integration
def test_merge_flow_consolidates_a_full_finetune_and_uploads_it(prefect_server, s3_server, zero3_run,
                                                                tiny_model_dir, tmp_path):
    import s3fs

    from flows.merge import merge
    from helpers.flow_runs import flow_run_artifacts
    from vlm_core.config import load_config
    from vlm_core.storage import download_folder, is_complete

    fs = s3fs.S3FileSystem()
    if not fs.exists("full-bucket"):
        fs.mkdir("full-bucket")
    train = tmp_path / "train"
    shutil.copytree(zero3_run / "checkpoint-3", train / "checkpoint-3")
    shutil.copytree(zero3_run / "checkpoint-3", train / "checkpoint-9", ignore=shutil.ignore_patterns(COMPLETE_MARKER))
    (train / "run_identity.json").write_text(json.dumps({"identity": "feedbeef" * 8}))  # as training records it
    cfg = load_config(None, ["name=full-run", f"model.path={tiny_model_dir}", "model.dtype=float32",
                             "lora.enabled=false", f"train.output_dir={train}", "storage.url=s3://full-bucket",
                             f"data.shards={tmp_path / 'no-shards'}"])
    state = merge(cfg, return_state=True)
    result = state.result()
    # checkpoint-9 is newer but incomplete (no marker): the newest *complete* one is consolidated
    assert result["source"] == "zero" and not result["skipped"]
    assert result["uploaded_to"] == "s3://full-bucket/runs/full-run-feedbeef/merged"
    assert is_complete("s3://full-bucket/runs/full-run-feedbeef/merged")
    assert "checkpoint-3" in flow_run_artifacts(state.state_details.flow_run_id)["merged-model"].data
    download_folder("s3://full-bucket/runs/full-run-feedbeef/merged", tmp_path / "back")
    trained, got = _weights(zero3_run / "final"), _weights(tmp_path / "back")
    assert all(torch.equal(got[k], trained[k]) for k in trained)
    assert merge(cfg)["skipped"] is True
