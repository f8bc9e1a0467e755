"""Loading a checkpoint: clear errors for wrong folders, options applied, URL fetch through real S3."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from vlm_core.config import ConfigError, ModelConfig
from vlm_core.model.load import load_model, load_tokenizer


def _cfg(path, **kw) -> ModelConfig:
    return ModelConfig(path=str(path), dtype="float32", attn_implementation="sdpa", **kw)


def test_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_model(_cfg(tmp_path / "nope"))
    assert f"model.path={tmp_path / 'nope'}: folder does not exist" in str(e.value)
    assert "build_tiny_if_missing" in str(e.value)


def test_non_internvl_model_is_refused(tmp_path):
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen")
    with pytest.raises(ConfigError, match=r"model_type 'qwen2', not 'internvl'"):
        load_model(_cfg(tmp_path / "qwen"))


def test_original_internvl_format_and_broken_folders(tmp_path, tiny_model_dir):
    chat = tmp_path / "chat"
    chat.mkdir()
    (chat / "config.json").write_text(json.dumps({"model_type": "internvl_chat", "auto_map": {}}))
    with pytest.raises(ConfigError, match="original InternVL format.*-hf"):
        load_model(_cfg(chat))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(_cfg(empty))
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_model_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ConfigError, match="no weight files"):
        load_model(_cfg(no_weights))
    remote = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, remote)
    data = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps(data | {"auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(ConfigError, match="model.trust_remote_code=true"):
        load_model(_cfg(remote))


def test_options_are_applied(tiny_model_dir, batch):
    model = load_model(ModelConfig(path=str(tiny_model_dir), dtype="bfloat16", gradient_checkpointing=True))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "sdpa"  # auto on a CPU machine
    assert model.model.language_model.is_activation_checkpointing is True
    model.train()
    model(**{**batch, "pixel_values": batch["pixel_values"].bfloat16()}).loss.backward()
    assert model.lm_head.weight.grad is not None
    with pytest.raises(ConfigError, match="flash_attention_2 needs the flash-attn package"):
        load_model(_cfg(tiny_model_dir).model_copy(update={"attn_implementation": "flash_attention_2"}))


def test_tiny_model_is_built_where_config_points(tmp_path):
    folder = tmp_path / "models" / "tiny"
    model = load_model(_cfg(folder, build_tiny_if_missing=True))
    assert (folder / "model.safetensors").is_file() and model.config.model_type == "internvl"
    assert load_tokenizer(_cfg(folder)).context_image_token == "<IMG_CONTEXT>"


@pytest.mark.integration
def test_model_from_s3_url_is_fetched_once(s3_server, tiny_model_dir, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("models")
    fs.put(str(tiny_model_dir) + "/", "models/tiny/", recursive=True)
    cfg = _cfg("s3://models/tiny", cache_dir=str(tmp_path / "cache"))
    first = load_model(cfg)
    fs.rm("models/tiny", recursive=True)  # the cached copy must serve the second load
    second = load_model(cfg)
    for (n, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert not list((tmp_path / "cache").glob("*.partial-*"))
    with pytest.raises(ConfigError, match="no folder at that URL"):
        load_model(_cfg("s3://models/absent", cache_dir=str(tmp_path / "cache")))


def test_demo_config_builds_its_tiny_model_on_a_fresh_clone(tmp_path, monkeypatch, batch):
    from pathlib import Path

    from vlm_core.config import load_config
    from vlm_core.model import build_for_training

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    monkeypatch.chdir(tmp_path)  # relative paths in the demo config resolve against the run's folder
    cfg = load_config(demo)
    assert not Path(cfg.model.path).exists()
    model = build_for_training(cfg)
    assert (tmp_path / cfg.model.path / "config.json").is_file()
    assert torch.isfinite(model(**batch).loss)
