"""FinetuneConfig: YAML + overrides, JSON round trip, documentation and error messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from vlm_core.config import (
    ConfigError,
    DataConfig,
    FinetuneConfig,
    from_json,
    load_config,
    to_json,
    to_yaml,
    validate_config,
)
from vlm_core.data.readers import read_meta
from vlm_core.launch import check_run

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = ROOT / "deployments" / "finetune.yaml"  # the parameters `vlmft deploy` registers
SHIPPED = sorted((ROOT / "configs").glob("*.yaml")) + [DEPLOYMENT]


def _all_fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        yield prefix + name, field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _all_fields(field.annotation, prefix + name + ".")


def test_every_field_is_documented():
    fields = list(_all_fields(FinetuneConfig))
    assert len(fields) > 40
    undocumented = [k for k, f in fields if not (f.description and len(f.description) > 10)]
    assert undocumented == []
    assert {k.split(".")[0] for k, _ in fields} >= {"name", "data", "model", "lora", "train", "storage", "logging"}


def test_sections_forbid_unknown_keys_in_json_schema():
    schema = FinetuneConfig.model_json_schema()
    assert schema["additionalProperties"] is False
    assert all(d.get("additionalProperties") is False for d in schema["$defs"].values())
    assert schema["$defs"]["TrainConfig"]["properties"]["loss_reduction"]["enum"] == ["token", "sample", "square"]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_load_and_round_trip(path):
    cfg = load_config(path)
    assert from_json(to_json(cfg)) == cfg
    assert validate_config(yaml.safe_load(to_yaml(cfg))) == cfg
    raw = yaml.safe_load(path.read_text())
    assert cfg.name == raw["name"]  # the file's values are the ones used, not defaults


def test_demo_config_is_shipped_and_self_contained():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.model.build_tiny_if_missing and cfg.model.dtype == "float32"
    assert cfg.storage.url and "://" not in cfg.storage.url  # local folder: no credentials needed


def test_deployment_config_runs_on_a_worker_from_the_repo_root(demo_data):
    """deployments/finetune.yaml as `vlmft deploy --config` registers it: its JSON form is what Prefect stores
    as the deployment's parameters and hands back to the flow; the worker runs flows with the repository root
    as working directory, so every path must be relative and the model buildable on a fresh clone."""
    cfg = load_config(DEPLOYMENT)
    params = json.loads(json.dumps({"cfg": cfg.model_dump(mode="json")}))
    assert validate_config(params["cfg"]) == cfg
    paths = {"data.meta": cfg.data.meta, "data.shards": cfg.data.shards, "model.path": cfg.model.path,
             "train.output_dir": cfg.train.output_dir, "storage.url": cfg.storage.url}
    assert all(paths.values()), paths
    assert [k for k, v in paths.items() if Path(v).is_absolute()] == []  # resolved under the worker's clone
    assert cfg.model.build_tiny_if_missing and cfg.model.dtype == "float32"
    assert cfg.data.write_demo_if_missing  # a first run on a fresh server writes the demo data (vlm_core.demo)
    # every pre-launch check passes on this CPU-only machine, once shards exist
    check_run(load_config(DEPLOYMENT, [f"data.shards={demo_data['shards']}"]))


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [
            "train.learning_rate=2e-4",
            "train.max_steps=7",
            "lora.enabled=true",
            "lora.llm_target_modules=[q_proj, v_proj]",
            "logging.report_to=[]",
            "storage.url=s3://bucket/runs",
            "name=exp-1",
        ],
    )
    assert cfg.train.learning_rate == 2e-4 and cfg.train.max_steps == 7
    assert cfg.lora.enabled is True and cfg.lora.llm_target_modules == ["q_proj", "v_proj"]
    assert cfg.logging.report_to == [] and cfg.storage.url == "s3://bucket/runs" and cfg.name == "exp-1"
    assert load_config(ROOT / "configs" / "demo.yaml").train.max_steps != 7  # file untouched


def test_unknown_key_in_yaml_suggests_close_match(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lerning_rate: 0.1\nmodle:\n  path: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert str(f) in msg
    assert "train.lerning_rate: unknown key; did you mean 'train.learning_rate'?" in msg
    assert "modle: unknown key; did you mean 'model'?" in msg


def test_unknown_override_suggests_close_match():
    with pytest.raises(ConfigError, match=r"unknown key train\.lerning_rate; did you mean 'train\.learning_rate'"):
        load_config(None, ["train.lerning_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"unknown key trian; did you mean 'train'"):
        load_config(None, ["trian.max_steps=3"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, ["train.max_steps"])
    with pytest.raises(ConfigError, match="train.max_steps.x"):
        load_config(None, ["train.max_steps.x=1"])


def test_bad_values_name_key_and_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.deepspeed=zero9", "model.dtype=fp8", "data.max_dynamic_patch=0", "train.learning_rate=abc"])
    msg = str(e.value)
    assert "train.deepspeed: must be one of 'none', 'zero1', 'zero2', 'zero3' or 'zero3_offload' (got 'zero9')" in msg
    assert "model.dtype: must be one of 'float32', 'bfloat16' or 'float16' (got 'fp8')" in msg
    assert "data.max_dynamic_patch: must be greater than or equal to 1 (got 0)" in msg
    assert "train.learning_rate:" in msg


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["data.min_dynamic_patch=8", "data.max_dynamic_patch=4"], "data.min_dynamic_patch (8) must not exceed"),
        (["train.nnodes=2", "train.node_rank=2"], "train.node_rank (2) must be below train.nnodes (2)"),
        (["model.freeze_vision=false", "model.unfreeze_vision_layers=1"], "model.unfreeze_vision_layers only applies"),
        (["lora.enabled=true", "lora.llm=false"], "neither lora.llm nor lora.vision"),
        (["name=my run"], "name: String should match pattern"),
    ],
)
def test_cross_field_errors_name_the_keys(overrides, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="run.json: not valid JSON"):
        from_json("{")


@pytest.mark.integration
def test_cli_prints_validated_config_and_rejects_bad_keys(tmp_path):
    vlmft = Path(sys.executable).parent / "vlmft"
    ok = subprocess.run(
        [vlmft, "config", "--config", ROOT / "configs" / "demo.yaml", "train.max_steps=11", "--format", "json"],
        capture_output=True, text=True, check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert from_json(ok.stdout).train.max_steps == 11
    bad = subprocess.run(
        [vlmft, "config", "-c", ROOT / "configs" / "demo.yaml", "train.lerning_rate=1"],
        capture_output=True, text=True, check=False,
    )
    assert bad.returncode == 2
    assert "did you mean 'train.learning_rate'" in bad.stderr and bad.stdout == ""


def test_demo_data_is_written_only_where_asked_and_never_over_a_meta(tmp_path):
    from vlm_core.demo import ensure_demo_data

    assert ensure_demo_data(DataConfig(meta=str(tmp_path / "off" / "meta.json"))) is None
    assert not (tmp_path / "off").exists()  # a user's missing data is an error later, never invented
    on = DataConfig(meta=str(tmp_path / "on" / "meta.json"), write_demo_if_missing=True)
    assert ensure_demo_data(on) == tmp_path / "on" and {d.name for d in read_meta(on.meta, None)} == {"colour", "shape", "same_colour", "text"}
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "meta.json").write_text("{}")
    assert ensure_demo_data(DataConfig(meta=str(tmp_path / "own" / "meta.json"), write_demo_if_missing=True)) is None
    assert (tmp_path / "own" / "meta.json").read_text() == "{}"
    for meta in ("s3://bucket/meta.json", str(tmp_path / "data.json")):
        with pytest.raises(ConfigError, match=r"data.write_demo_if_missing=true writes the demo data set as FOLDER/meta"):
            load_config(None, ["data.write_demo_if_missing=true", f"data.meta={meta}"])
