"""Lineage and the model card: every field is recorded, the card's front matter is valid Hugging Face YAML
holding the metrics, and the recorded config rebuilds byte-identical shards."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import yaml

from vlm_core.checkpoints import mark_complete
from vlm_core.config import load_config
from vlm_core.data.shards import prepare_shards
from vlm_core.demo import write_demo_data
from vlm_core.identity import claim_run_folder, make_identity
from vlm_core.lineage import CONFIG_FILE, build_lineage, config_hash, git_commit, write_model_card
from vlm_core.promote import lineage_summary, read_model_lineage, read_model_metrics

ROOT = Path(__file__).resolve().parents[1]
MODEL_HASH = "b" * 64
METRICS = {"overall": {"count": 12, "exact_match": 0.5, "f1": 0.625, "anls": 0.7},
           "datasets": {"shapes": {"count": 8, "exact_match": 0.625, "f1": 0.75, "anls": 0.8},
                        "text": {"count": 4, "exact_match": 0.25, "f1": 0.375, "anls": 0.5}}}


def prepared(tmp_path: Path, *overrides: str):
    """A config over 16 generated demo samples with their shards prepared, and the run identity."""
    meta = write_demo_data(tmp_path / "data", n=16)
    cfg = load_config(None, [f"data.meta={meta}", f"data.shards={tmp_path / 'shards'}", "data.eval_count=4",
                             "data.max_dynamic_patch=2", "lora.enabled=true", *overrides])
    manifest = prepare_shards(cfg.data)
    return cfg, make_identity(cfg, manifest.fingerprint, MODEL_HASH)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_lineage_records_data_config_model_software_and_run(tmp_path):
    cfg, identity = prepared(tmp_path, "train.resume_from=/runs/old/checkpoint-40")
    lineage = build_lineage(cfg, identity, metrics=METRICS, flow_run_id="run-123", started_at="2026-01-01T00:00:00Z",
                            ended_at="2026-01-01T01:00:00Z", model_url="s3://b/runs/demo-x/merged")
    manifest_bytes = (tmp_path / "shards" / "manifest.json").read_bytes()
    assert lineage["identity"] == identity.id and lineage["run_id"] == f"demo-{identity.id[:8]}"
    assert lineage["data"]["fingerprint"] == json.loads(manifest_bytes)["fingerprint"] == identity.data
    assert lineage["data"]["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert (lineage["data"]["train_samples"], lineage["data"]["eval_samples"]) == (12, 4)
    assert lineage["data"]["meta"] == cfg.data.meta and lineage["data"]["datasets"] == sorted(json.loads(manifest_bytes)["datasets"])
    assert lineage["config"] == cfg.model_dump(mode="json") and lineage["config_hash"] == config_hash(cfg)
    assert lineage["base_model"] == {"path": cfg.model.path, "hash": MODEL_HASH}
    assert lineage["parent"] == {"checkpoint": "/runs/old/checkpoint-40", "identity": None}
    assert lineage["metrics"] == METRICS and lineage["flow_run_id"] == "run-123"
    assert (lineage["started_at"], lineage["ended_at"]) == ("2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z")
    assert lineage["software"]["package"] == "vlm-finetune" and lineage["software"]["version"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert lineage["software"]["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert identity.data in lineage["rebuild"] and CONFIG_FILE in lineage["rebuild"]
    summary = lineage_summary(lineage)
    assert summary["data_fingerprint"] == identity.data and summary["config_hash"] == lineage["config_hash"]
    json.dumps(lineage)  # all of it is JSON

    other_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"learning_rate": 1e-4, "resume_from": "auto"})})
    other = build_lineage(other_cfg, identity)
    assert other["config_hash"] != lineage["config_hash"] and other["parent"] is None


def test_the_parent_comes_from_the_run_folders_record(tmp_path):
    """A run continued on purpose from another run's checkpoint and then resumed (resume_from=auto): the
    parent recorded in run_identity.json when it started is still its lineage's parent."""
    cfg, identity = prepared(tmp_path, f"train.output_dir={tmp_path / 'train'}")
    checkpoint = tmp_path / "old" / "checkpoint-40"
    checkpoint.mkdir(parents=True)
    mark_complete(checkpoint, 40, identity="c" * 64)
    started = cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume_from": str(checkpoint)})})
    claim_run_folder(started, identity)
    parent = build_lineage(cfg, identity)["parent"]  # cfg: resume_from=auto, identity without its parent
    assert parent == {"checkpoint": str(checkpoint.resolve()), "identity": "c" * 64}


def test_git_commit_is_none_outside_a_checkout_and_without_git(tmp_path, monkeypatch):
    assert git_commit(tmp_path) is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable to be found
    assert git_commit() is None


def test_model_card_front_matter_holds_the_metrics_per_data_set(tmp_path):
    cfg, identity = prepared(tmp_path)
    folder = tmp_path / "merged"
    folder.mkdir()
    lineage = build_lineage(cfg, identity, metrics=METRICS)
    card = write_model_card(folder, cfg, METRICS, lineage).read_text()
    front = front_matter(card)
    assert front["base_model"] == cfg.model.path and front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "image-text-to-text" and {"vlm-finetune", "lora"} <= set(front["tags"])
    [index] = front["model-index"]
    assert index["name"] == "demo"
    got = {r["dataset"]["name"]: {m["type"]: m["value"] for m in r["metrics"]} for r in index["results"]}
    want = {"all held-out samples": METRICS["overall"], **METRICS["datasets"]}
    assert got == {name: {k: v for k, v in s.items() if k != "count"} for name, s in want.items()}
    assert all(m["name"] for r in index["results"] for m in r["metrics"])
    assert "| shapes | 8 | 0.625 | 0.750 | 0.800 |" in card and "AutoModelForImageTextToText" in card
    assert identity.id in card and lineage["config_hash"] in card

    assert read_model_lineage(str(folder)) == {**lineage, "metrics": METRICS}
    assert read_model_metrics(str(folder)) == METRICS

    bare = write_model_card(tmp_path / "merged", cfg, None, build_lineage(cfg, identity)).read_text()
    assert "model-index" not in front_matter(bare) and "Not evaluated." in bare


def test_the_recorded_config_rebuilds_the_exact_shards_and_run_identity(tmp_path):
    """Given a published model folder alone: its vlmft_config.yaml prepares byte-identical shards (same
    fingerprint, same shard sha256s) and gives the same run identity."""
    cfg, identity = prepared(tmp_path)
    folder = tmp_path / "merged"
    folder.mkdir()
    lineage = build_lineage(cfg, identity, metrics=METRICS)
    write_model_card(folder, cfg, METRICS, lineage)

    rebuilt_cfg = load_config(folder / CONFIG_FILE, [f"data.shards={tmp_path / 'rebuilt'}"])
    rebuilt = prepare_shards(rebuilt_cfg.data)
    original = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert rebuilt.fingerprint == lineage["data"]["fingerprint"]
    assert [s.sha256 for s in rebuilt.train.shards + rebuilt.eval.shards] == [
        s["sha256"] for s in original["train"]["shards"] + original["eval"]["shards"]]
    assert make_identity(rebuilt_cfg, rebuilt.fingerprint, MODEL_HASH).id == lineage["identity"]
    assert config_hash(load_config(folder / CONFIG_FILE)) == lineage["config_hash"]
