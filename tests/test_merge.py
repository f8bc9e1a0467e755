"""LoRA merge: plain-transformers loadable output that matches base + adapter, verified, idempotent."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoTokenizer, InternVLForConditionalGeneration

from vlm_core.config import ConfigError, DataConfig, ModelConfig, load_config
from vlm_core.merge import merge_lora, verify_merged
from vlm_core.model import build_for_training
from vlm_core.publish import MERGE_INFO, MergeVerificationError

DATA = DataConfig(max_dynamic_patch=2)  # the training run's data settings (the tiny base model says 6)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, batch, tmp_path_factory):
    """A real LoRA adapter (LLM adapters + fully trained projector) after a few AdamW steps."""
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "model.dtype=float32", "lora.enabled=true", "lora.r=4"])
    model = build_for_training(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(4):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("adapter") / "checkpoint-4"
    model.save_pretrained(out)
    return out


def _mc(tiny_model_dir) -> ModelConfig:
    return ModelConfig(path=str(tiny_model_dir), dtype="float32")


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_merged_model_loads_with_plain_transformers_and_matches(tiny_model_dir, adapter_dir, batch, tmp_path):
    from peft import PeftModel

    report = merge_lora(_mc(tiny_model_dir), str(adapter_dir), tmp_path / "merged", data=DATA)
    assert not report.skipped and report.relative_diff <= 1e-4 and report.dtype == "float32"
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert isinstance(merged, InternVLForConditionalGeneration)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    base = InternVLForConditionalGeneration.from_pretrained(tiny_model_dir)
    base_logits = _logits(base, batch)
    ref = _logits(PeftModel.from_pretrained(base, adapter_dir), batch)
    got = _logits(merged, batch)
    assert (ref - got).abs().max().item() < 1e-4
    assert (ref - base_logits).abs().max().item() > 1e-3  # the adapter really changes the model
    names = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "preprocessor_config.json", MERGE_INFO} <= names
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").context_image_token == "<IMG_CONTEXT>"


def test_second_merge_is_a_noop_and_verify_catches_tampering(tiny_model_dir, adapter_dir, tmp_path):
    out = tmp_path / "merged"
    merge_lora(_mc(tiny_model_dir), str(adapter_dir), out, data=DATA)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = merge_lora(_mc(tiny_model_dir), str(adapter_dir), out, data=DATA)
    assert again.skipped and (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert verify_merged(tiny_model_dir, adapter_dir, out).relative_diff <= 1e-4

    weights = load_file(out / "model.safetensors")
    key = next(k for k in weights if "lm_head" in k)
    weights[key] = weights[key] + 0.05
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeVerificationError, match=r"differs from base \+ adapter by max \|Δlogit\| = "):
        verify_merged(tiny_model_dir, adapter_dir, out)

    tampered = tmp_path / "tampered-adapter"
    shutil.copytree(adapter_dir, tampered)
    aw = load_file(tampered / "adapter_model.safetensors")
    k = next(k for k in aw if "lora_B" in k)
    aw[k] = aw[k] * 3
    save_file(aw, tampered / "adapter_model.safetensors", metadata={"format": "pt"})
    fresh = tmp_path / "fresh"
    merge_lora(_mc(tiny_model_dir), str(adapter_dir), fresh, data=DATA)
    with pytest.raises(MergeVerificationError):
        verify_merged(tiny_model_dir, tampered, fresh)
    # a changed adapter changes the fingerprint: the merge runs again
    assert not merge_lora(_mc(tiny_model_dir), str(tampered), fresh, data=DATA).skipped


def test_refuses_to_publish_a_bad_merge(tiny_model_dir, adapter_dir, tmp_path):
    with pytest.raises(MergeVerificationError, match=r"refusing to publish .* tolerance 0\)"):
        merge_lora(_mc(tiny_model_dir), str(adapter_dir), tmp_path / "strict", tolerance=0.0, data=DATA)
    assert not (tmp_path / "strict").exists() and not list(tmp_path.glob("strict.tmp-*"))
    nan = tmp_path / "nan-adapter"
    shutil.copytree(adapter_dir, nan)
    aw = load_file(nan / "adapter_model.safetensors")
    k = next(k for k in aw if "lora_A" in k)
    aw[k][0, 0] = float("nan")
    save_file(aw, nan / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeVerificationError, match="inf"):
        merge_lora(_mc(tiny_model_dir), str(nan), tmp_path / "nan-merged", data=DATA)
    assert not (tmp_path / "nan-merged").exists()
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        merge_lora(_mc(tiny_model_dir), str(tmp_path), tmp_path / "x", data=DATA)


@pytest.mark.integration
def test_adapter_from_storage_and_merged_upload(s3_server, tiny_model_dir, adapter_dir, tmp_path):
    import s3fs

    from vlm_core.storage import download_folder, upload_folder

    fs = s3fs.S3FileSystem()
    if not fs.exists("merge-bucket"):
        fs.mkdir("merge-bucket")
    upload_folder(adapter_dir, "s3://merge-bucket/runs/r1/checkpoint-4")
    report = merge_lora(ModelConfig(path=str(tiny_model_dir), dtype="float32", cache_dir=str(tmp_path / "cache")),
                        "s3://merge-bucket/runs/r1/checkpoint-4", tmp_path / "merged", data=DATA)
    assert report.relative_diff <= 1e-4
    upload_folder(tmp_path / "merged", "s3://merge-bucket/runs/r1/merged")
    download_folder("s3://merge-bucket/runs/r1/merged", tmp_path / "back")
    info = json.loads((tmp_path / "back" / MERGE_INFO).read_text())
    assert info["fingerprint"] == report.fingerprint
    AutoModelForImageTextToText.from_pretrained(tmp_path / "back")
