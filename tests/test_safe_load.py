"""No code runs from a crafted checkpoint file (vlm_core.safe_load).

Genuine checkpoints of every ZeRO stage (and none), written by the training entry point, pass the
check: the allowlist is wide enough. Each kind of pickle file that resume or consolidation reads,
made to carry a payload that would create a marker file, is refused with its name: by the check, by
safe_torch_load, by DeepSpeed's own loaders under torch_load_weights_only, by a real resume (locally
and from S3 with the manifest re-written to match, as anyone who can write the bucket can) and by
consolidation. The marker never appears.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import s3fs
import torch

from helpers import data as D
from helpers.servers import free_port
from vlm_core.checkpoints import upload_new_checkpoints
from vlm_core.config import DataConfig, FinetuneConfig, ModelConfig, load_config, to_json
from vlm_core.consolidate import consolidate_checkpoint
from vlm_core.launch import command, thread_env
from vlm_core.safe_load import (
    UnsafeCheckpointError,
    check_checkpoint_files,
    safe_torch_load,
    torch_load_weights_only,
)
from vlm_core.storage import CHECKSUMS, sha256_file

# stage -> LoRA or not: both kinds write the same globals, so each stage is made once, LoRA or full
RUNS = {"none": True, "zero1": False, "zero2": True, "zero3": False}
REFUSED = "refused to load: it asks the unpickler for the global getattr"  # pathlib.Path.touch, pickled


class Touch:
    """Unpickled by a full unpickler, this creates `marker`: the stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def craft(path: Path, marker: Path) -> None:
    """What an attacker does: the genuine file's content, plus a payload, saved back under the same name."""
    obj = torch.load(path, weights_only=False)  # our own genuine file, written moments ago
    if isinstance(obj, dict):
        obj["extra"] = Touch(marker)
    else:  # training_args.bin: a TrainingArguments object
        obj.extra = Touch(marker)
    torch.save(obj, path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_model_dir) -> Path:
    return D.training_shards(tmp_path_factory.mktemp("safe-load-data"), tiny_model_dir, 8, 4, 0)


def _cfg(tiny_model_dir: Path, shards: Path, out: Path, stage: str, *extra: str) -> FinetuneConfig:
    return load_config(None, [
        "name=safe", f"model.path={tiny_model_dir}", "model.dtype=float32", f"data.shards={shards}",
        "data.max_dynamic_patch=2", "data.num_workers=0", "data.shuffle_buffer=4", f"train.output_dir={out}",
        "train.per_device_batch_size=2", "train.warmup_ratio=0", "train.bf16=false", "train.logging_steps=1",
        "train.save_steps=1", "train.max_steps=1", "train.launcher=python", "train.nproc_per_node=1",
        f"train.deepspeed={stage}", f"lora.enabled={str(RUNS[stage]).lower()}", "lora.r=4",
        f"train.master_port={free_port()}", "logging.report_to=[]", *extra])


def _start(cfg: FinetuneConfig, **env: str) -> subprocess.Popen:
    """The training entry point, as train_task launches it (`python -m vlm_core.train --config run.json`)."""
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(to_json(cfg))
    return subprocess.Popen(command(cfg, out / "run.json"), env={**os.environ, **thread_env(cfg), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    """(exit code, stderr); stdout and stderr end up in the assertion message."""
    out, err = proc.communicate(timeout=300)
    return proc.returncode, err + "\n" + out[-2000:]


@pytest.fixture(scope="module")
def genuine(tmp_path_factory, tiny_model_dir, shards) -> dict[str, Path]:
    """{stage: checkpoint-1/} of one real optimizer step and save per ZeRO stage (and none)."""
    root = tmp_path_factory.mktemp("genuine")
    for pair in (["none", "zero1"], ["zero2", "zero3"]):  # two at a time, one thread each: start-up dominates
        procs = [_start(_cfg(tiny_model_dir, shards, root / stage, stage), OMP_NUM_THREADS="1") for stage in pair]
        for proc in procs:
            rc, log = _finish(proc)
            assert rc == 0, log[-4000:]
    return {stage: root / stage / "checkpoint-1" for stage in RUNS}


def _copy_run(genuine: dict[str, Path], stage: str, dest: Path) -> Path:
    """A copy of a stage's run folder (config, checkpoint) to tamper with; returns its checkpoint-1/."""
    shutil.copytree(genuine[stage].parent, dest, ignore=shutil.ignore_patterns("final", "run_summary.json"))
    return dest / "checkpoint-1"


# ------------------------------------------------------------------------------------------------ the allowlist


@pytest.mark.integration
@pytest.mark.parametrize("stage", list(RUNS))
def test_genuine_checkpoints_of_every_stage_pass(genuine, stage):
    files = {p.relative_to(genuine[stage]).as_posix() for p in check_checkpoint_files(genuine[stage])}
    expected = {"rng_state.pth", "scheduler.pt", "training_args.bin"}
    if stage == "none":
        expected.add("optimizer.pt")
    else:  # DeepSpeed's shards, under their ZeRO-1/2 or ZeRO-3 names
        prefix = "zero_pp_rank_0_" if stage == "zero3" else ""
        expected |= {f"global_step1/{prefix}mp_rank_00_model_states.pt",
                     "global_step1/zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    assert files == expected


@pytest.mark.integration
def test_training_args_classes_are_allowed_in_training_args_bin_only(genuine, tmp_path):
    args = safe_torch_load(genuine["zero2"] / "training_args.bin")
    assert args.learning_rate > 0 and type(args).__name__ == "_SavedAttributes"  # rebuilt, never constructed
    shutil.copy(genuine["zero2"] / "training_args.bin", tmp_path / "scheduler.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"scheduler.pt: .*global transformers.training_args"):
        safe_torch_load(tmp_path / "scheduler.pt")


def test_a_call_of_an_allowed_class_is_refused(tmp_path):
    """A crafted training_args.bin may name TrainingArguments, but may not call it (its constructor has effects)."""
    from transformers import TrainingArguments

    class CallsTrainingArguments:
        def __reduce__(self):
            return TrainingArguments, (str(tmp_path / "made-by-the-file"),)

    torch.save(CallsTrainingArguments(), tmp_path / "training_args.bin")
    with pytest.raises(UnsafeCheckpointError, match=r"training_args.bin: refused to load.*to call a class"):
        safe_torch_load(tmp_path / "training_args.bin")


# ------------------------------------------------------------------------------------------------ crafted files


def test_the_payload_is_real_and_torch_load_weights_only_stops_it(tmp_path):
    marker, crafted = tmp_path / "pwned", tmp_path / "scheduler.pt"
    torch.save({"last_epoch": 1, "extra": Touch(marker)}, crafted)
    torch.load(crafted, weights_only=False)  # what DeepSpeed's loaders do: the payload runs
    assert marker.exists()
    marker.unlink()

    original = torch.load
    with pytest.raises(UnsafeCheckpointError, match=f"{re.escape(str(crafted))}: {REFUSED}"):
        with torch_load_weights_only():
            assert torch.load is safe_torch_load
            torch.load(crafted, map_location="cpu", weights_only=False)
    assert torch.load is original and not marker.exists()  # restored, also after an error


KINDS = ["global_step1/mp_rank_00_model_states.pt", "global_step1/zero_pp_rank_0_mp_rank_00_optim_states.pt",
         "rng_state.pth", "scheduler.pt", "training_args.bin"]


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_a_crafted_file_of_each_kind_is_refused_by_name(genuine, tmp_path, kind):
    ckpt = _copy_run(genuine, "zero2", tmp_path / "run")
    marker = tmp_path / "pwned"
    craft(ckpt / kind, marker)
    with pytest.raises(UnsafeCheckpointError, match=f"{re.escape(str(ckpt / kind))}: {REFUSED}.*tampered with"):
        check_checkpoint_files(ckpt)
    with pytest.raises(UnsafeCheckpointError, match=f"{re.escape(str(ckpt / kind))}: {REFUSED}"):
        safe_torch_load(ckpt / kind, weights_only=False)
    assert not marker.exists()


@pytest.mark.integration
def test_deepspeed_loaders_are_stopped_under_torch_load_weights_only(genuine, tmp_path):
    """The readers that hard-code weights_only=False: the checkpoint engine (resume) and zero_to_fp32."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = _copy_run(genuine, "zero3", tmp_path / "run")
    states = ckpt / "global_step1" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    with torch_load_weights_only():
        assert TorchCheckpointEngine().load(str(states))["ds_version"]  # genuine: loads
    craft(states, tmp_path / "pwned")
    with torch_load_weights_only():
        with pytest.raises(UnsafeCheckpointError, match=f"{re.escape(str(states))}: {REFUSED}"):
            TorchCheckpointEngine().load(str(states), map_location="cpu")
        with pytest.raises(UnsafeCheckpointError, match=f"{re.escape(str(states))}: {REFUSED}"):
            get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------------ the real paths


@pytest.mark.integration
def test_resume_from_a_crafted_checkpoint_fails_naming_the_file(genuine, tiny_model_dir, shards, tmp_path):
    ckpt = _copy_run(genuine, "zero2", tmp_path / "run")
    bad = ckpt / "global_step1" / "mp_rank_00_model_states.pt"
    craft(bad, tmp_path / "pwned")
    cfg = _cfg(tiny_model_dir, shards, tmp_path / "more", "zero2", "train.max_steps=2", f"train.resume_from={ckpt}")
    rc, log = _finish(_start(cfg))
    assert rc == 2 and f"vlm_core.train: {bad}: {REFUSED}" in log, log[-4000:]
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "more" / "checkpoint-2").exists()


@pytest.mark.integration
def test_vlmft_train_refuses_a_crafted_checkpoint_from_storage(s3_server, genuine, tiny_model_dir, shards, tmp_path):
    """The bucket's writer swaps rng_state.pth and re-writes the manifest; `vlmft train` fails before launching."""
    fs = s3fs.S3FileSystem()
    fs.mkdir("safe-load-bucket")
    _copy_run(genuine, "zero2", tmp_path / "machine1")
    run_id = json.loads((genuine["zero2"].parent / "run_summary.json").read_text())["run_id"]  # name-identity
    assert upload_new_checkpoints(tmp_path / "machine1", "s3://safe-load-bucket", run_id) == ["checkpoint-1"]

    remote = f"safe-load-bucket/runs/{run_id}/checkpoint-1"
    bad = tmp_path / "rng_state.pth"
    fs.get_file(f"{remote}/rng_state.pth", str(bad))
    craft(bad, tmp_path / "pwned")
    fs.put_file(str(bad), f"{remote}/rng_state.pth")
    manifest = json.loads(fs.cat_file(f"{remote}/{CHECKSUMS}"))
    manifest["files"]["rng_state.pth"] = {"size": bad.stat().st_size, "sha256": sha256_file(bad)}
    fs.pipe_file(f"{remote}/{CHECKSUMS}", json.dumps(manifest).encode())
    fs.invalidate_cache()

    out = tmp_path / "machine2"  # a new machine: nothing local, the checkpoint comes from storage
    cfg = _cfg(tiny_model_dir, shards, out, "zero2", "storage.url=s3://safe-load-bucket")  # the same run
    (tmp_path / "cfg.yaml").write_text(to_json(cfg))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    res = subprocess.run([sys.executable, "-m", "vlmft", "train", "--config", str(tmp_path / "cfg.yaml")],
                         capture_output=True, text=True, timeout=300, env=env)
    fetched = out / "checkpoint-1" / "rng_state.pth"
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"vlmft: {fetched}: {REFUSED}" in res.stderr  # downloaded (checksums matched), then refused
    assert "Retry 1/1" not in res.stdout + res.stderr  # a retry would find the same file
    assert not (out / "train.log").exists()  # no training process was ever launched
    assert not (tmp_path / "pwned").exists()


@pytest.mark.integration
def test_consolidating_a_crafted_zero3_checkpoint_fails_naming_the_file(genuine, tiny_model_dir, tmp_path):
    ckpt = _copy_run(genuine, "zero3", tmp_path / "run")
    for weights in ckpt.glob("model*.safetensors"):  # ZeRO-3 shards only: consolidation must read them
        weights.unlink()
    bad = ckpt / "global_step1" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    craft(bad, tmp_path / "pwned")
    with pytest.raises(UnsafeCheckpointError, match=f"{re.escape(str(bad))}: {REFUSED}"):
        consolidate_checkpoint(ckpt, ModelConfig(path=str(tiny_model_dir), dtype="float32"), tmp_path / "out",
                               data=DataConfig())
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()
