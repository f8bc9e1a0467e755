"""Run identity: which settings it covers, what changes it, and how a run folder is claimed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vlm_core.checkpoints import mark_complete, resolve_resume
from vlm_core.config import ConfigError, FinetuneConfig, load_config
from vlm_core.identity import (
    IDENTITY_FILE,
    NOT_IN_IDENTITY,
    IdentityMismatch,
    claim_run_folder,
    identity_settings,
    make_identity,
    model_hash,
    with_run_dir,
)


def _cfg(out: Path, *extra: str) -> FinetuneConfig:
    return load_config(None, [f"train.output_dir={out}", *extra])


def _leaf_keys(cfg: FinetuneConfig) -> set[str]:
    keys: set[str] = set()

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            keys.add(prefix)

    walk("", cfg.model_dump(mode="json"))
    return keys


def test_every_setting_is_in_the_identity_or_excluded_with_a_reason():
    cfg = FinetuneConfig()
    leaves = _leaf_keys(cfg)
    excluded = {k for k in leaves if k in NOT_IN_IDENTITY or k.split(".")[0] in NOT_IN_IDENTITY}
    assert set(identity_settings(cfg)) == leaves - excluded
    # every exclusion names a real setting or section, and says why
    sections = {k.split(".")[0] for k in leaves}
    assert all(k in leaves or k in sections for k in NOT_IN_IDENTITY)
    assert all(len(reason) > 10 for reason in NOT_IN_IDENTITY.values())
    assert {"train.learning_rate", "lora.r", "data.max_seq_length", "train.nproc_per_node"} <= set(identity_settings(cfg))


@pytest.mark.parametrize("change", ["train.learning_rate=1e-4", "lora.r=8", "train.max_steps=7", "data.shuffle_buffer=3",
                                    "data.resize_backend=pil",
                                    "model.freeze_llm=true", "train.nproc_per_node=4"])
def test_a_setting_that_changes_the_result_changes_the_identity(change, tmp_path):
    base = make_identity(_cfg(tmp_path), "data", "model")
    assert make_identity(_cfg(tmp_path, change), "data", "model").id != base.id


@pytest.mark.parametrize("change", ["name=other", "train.output_dir=/elsewhere", "train.master_port=1234",
                                    "train.save_steps=7", "storage.url=s3://b", "logging.report_to=[]",
                                    "data.shards=/other/shards", "model.path=/other/model", "train.resume_from=none"])
def test_naming_placing_and_logging_do_not_change_the_identity(change, tmp_path):
    base = make_identity(_cfg(tmp_path), "data", "model")
    assert make_identity(_cfg(tmp_path, change), "data", "model").id == base.id


def test_data_and_model_are_part_of_the_identity(tmp_path):
    cfg = _cfg(tmp_path)
    ids = {make_identity(cfg, d, m).id for d, m in [("d1", "m1"), ("d2", "m1"), ("d1", "m2")]}
    assert len(ids) == 3


def test_model_hash_follows_content_and_caches_by_size_and_mtime(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    cache = tmp_path / "cache"
    first = model_hash(copy, cache)
    assert model_hash(tiny_model_dir, cache) == first  # same files elsewhere: same hash
    assert len(json.loads((cache / "file_hashes.json").read_text())) >= 2 * len(list(copy.iterdir()))
    cfg_file = copy / "config.json"
    cfg_file.write_text(cfg_file.read_text() + " ")  # one byte more
    assert model_hash(copy, cache) != first


def test_a_folder_of_another_run_is_refused_naming_what_differs(tmp_path):
    out = tmp_path / "run"
    first = claim_run_folder(_cfg(out), make_identity(_cfg(out), "data", "model"))
    record = json.loads((out / IDENTITY_FILE).read_text())
    assert record["identity"] == first.id and record["settings"]["train.learning_rate"] == FinetuneConfig().train.learning_rate

    again = claim_run_folder(_cfg(out), make_identity(_cfg(out), "data", "model"))  # the same run: fine
    assert again.id == first.id
    changed = _cfg(out, "train.learning_rate=1e-4")
    with pytest.raises(IdentityMismatch) as err:
        claim_run_folder(changed, make_identity(changed, "data", "model"))
    text = str(err.value)
    assert first.id[:12] in text and "train.learning_rate" in text and "train.resume_from=PATH" in text
    assert "\n" not in text
    with pytest.raises(IdentityMismatch, match="data"):
        claim_run_folder(_cfg(out), make_identity(_cfg(out), "other data", "model"))
    assert json.loads((out / IDENTITY_FILE).read_text())["identity"] == first.id  # untouched


def test_resume_from_a_path_continues_on_purpose_and_records_the_parent(tmp_path):
    old = tmp_path / "old"
    first = claim_run_folder(_cfg(old), make_identity(_cfg(old), "data", "model"))
    ckpt = old / "checkpoint-4"
    ckpt.mkdir()
    mark_complete(ckpt, 4, first.id)
    new = _cfg(tmp_path / "new", "train.learning_rate=1e-5", f"train.resume_from={ckpt}")
    claimed = claim_run_folder(new, make_identity(new, "data", "model"))
    assert claimed.id != first.id
    assert claimed.parent == {"checkpoint": str(ckpt.resolve()), "identity": first.id}
    assert json.loads((tmp_path / "new" / IDENTITY_FILE).read_text())["parent"]["identity"] == first.id


def test_checkpoints_without_an_identity_are_not_continued_silently(tmp_path):
    out = tmp_path / "legacy"
    (out / "checkpoint-2").mkdir(parents=True)
    mark_complete(out / "checkpoint-2", 2)
    with pytest.raises(IdentityMismatch, match="without a run identity"):
        claim_run_folder(_cfg(out), make_identity(_cfg(out), "data", "model"))


def test_auto_resume_refuses_a_checkpoint_of_another_identity(tmp_path):
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    mark_complete(ckpt, 3, "a" * 64)
    assert resolve_resume("auto", tmp_path, "a" * 64) == ckpt
    with pytest.raises(ConfigError, match="aaaaaaaaaaaa"):
        resolve_resume("auto", tmp_path, "b" * 64)


def test_run_subdir_puts_each_identity_in_its_own_folder(tmp_path):
    cfg = _cfg(tmp_path / "runs", "name=exp", "train.run_subdir=true")
    identity = make_identity(cfg, "data", "model")
    resolved = with_run_dir(cfg, identity)
    assert resolved.train.output_dir == f"{tmp_path / 'runs'}/exp-{identity.id[:8]}"
    assert not resolved.train.run_subdir and with_run_dir(resolved, identity) == resolved
    assert with_run_dir(_cfg(tmp_path), identity).train.output_dir == str(tmp_path)
