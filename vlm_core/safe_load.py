"""Read checkpoint files without running code from them: `torch.load` restricted to an allowlist.

A checkpoint is data someone else may have written. The one resumed from may come from object
storage, and whoever can write the bucket can also rewrite its checksum manifest, so the download
check (vlm_core.storage) proves nothing about the content. Yet DeepSpeed reads its
`*_model_states.pt` / `*_optim_states.pt` with `torch.load(..., weights_only=False)` (its checkpoint
engine and `zero_to_fp32` hard-code it): a full unpickler, so a crafted file runs arbitrary code on
every rank that resumes or consolidates it.

Here every such read goes through `safe_torch_load`: `weights_only=True` (tensors, containers,
primitives) plus exactly the few globals that DeepSpeed and the HF Trainer really write into
checkpoints, and nothing else. `check_checkpoint_files` reads every pickle-based file of a checkpoint
that way before anything uses it, so a bad file fails at once with its name; `torch_load_weights_only`
makes every other `torch.load` in the process (DeepSpeed's, the Trainer's, zero_to_fp32's) do the same.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vlm_core.config import ConfigError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")  # torch.save files; safetensors and JSON hold no pickles
TRAINING_ARGS_FILE = "training_args.bin"
_ORIGINAL_LOAD = torch.load  # the real loader, whatever torch_load_weights_only does to torch.load later


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file asks the unpickler for something DeepSpeed and the Trainer never write."""


# How the allowlists were found: real checkpoints of every kind this project writes, made with its own
# entry point (`python -m vlm_core.train`, the tiny model, one step, one save) for train.deepspeed =
# none, zero1, zero2 and zero3, each with lora.enabled true and false (deepspeed 0.19.8, transformers
# 5.24, torch 2.14, numpy 2; fp32 on CPU). Every .pt/.pth/.bin file in them was loaded with
# `torch.load(f, weights_only=True)`, adding each "Unsupported global" the error named until it loaded.
# LoRA and full fine-tunes need the same globals; ZeRO-3 optimizer states hold no fragment_address.
# Files that needed none: optimizer.pt and scheduler.pt (no DeepSpeed), the *_model_states.pt of every
# stage (mp_rank_00_ for ZeRO-1/2, zero_pp_rank_0_mp_rank_00_ for ZeRO-3).
def _checkpoint_globals() -> list[Any]:
    """What resume and consolidation legitimately unpickle, imported from where the files name them."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [
        LossScaler,  # *_optim_states.pt, ZeRO-1/2/3: the optimizer's (static) loss scaler
        ZeroStageEnum,  # *_optim_states.pt, ZeRO-1/2/3
        fragment_address,  # *_optim_states.pt, ZeRO-1/2: param_slice_mappings
        # rng_state*.pth, every stage: numpy's RNG state is an array (transformers' own allowlist for this file)
        np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)),
    ]


class _SavedAttributes:
    """Stands in for a class pickled into training_args.bin: rebuilt from its saved attributes only.

    training_args.bin is the pickled TrainingArguments (with accelerate's PartialState, DeepSpeedPlugin
    and transformers' DeepSpeed config objects inside). Allowlisting those classes themselves would let a
    crafted file *call* them (pickle's REDUCE) with arguments of its choosing, and their constructors
    set ACCELERATE_* environment variables, read files and set up torch.distributed. Nothing that
    resumes or consolidates reads this file; it is only checked, so the stand-in is enough. Unpickling
    rebuilds it with `__new__` and its saved `__dict__`; a call (what a crafted file would do) fails.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise pickle.UnpicklingError("to call a class; training_args.bin may only rebuild objects from saved attributes")


# training_args.bin only, every stage (the last three with DeepSpeed only). The enums are the real ones:
# calling an enum only looks up a member.
_TRAINING_ARGS_CLASSES = (
    "transformers.training_args.TrainingArguments",
    "transformers.trainer_pt_utils.AcceleratorConfig",
    "accelerate.state.PartialState",
    "accelerate.utils.dataclasses.DeepSpeedPlugin",
    "transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig",
    "transformers.integrations.deepspeed.HfDeepSpeedConfig",
)


def _training_args_globals() -> list[Any]:
    from accelerate.utils.dataclasses import DistributedType
    from transformers.trainer_utils import HubStrategy, IntervalStrategy, SaveStrategy, SchedulerType
    from transformers.training_args import OptimizerNames

    return [SchedulerType, OptimizerNames, IntervalStrategy, SaveStrategy, HubStrategy, DistributedType,
            *((_SavedAttributes, name) for name in _TRAINING_ARGS_CLASSES)]


@functools.cache
def allowlist(training_args: bool = False) -> tuple[Any, ...]:
    """The globals a checkpoint file may name: those of training_args.bin only for that file."""
    return tuple(_checkpoint_globals() + (_training_args_globals() if training_args else []))


@contextlib.contextmanager
def _only_globals(allowed: tuple[Any, ...]) -> Iterator[None]:
    """Exactly `allowed` for the weights_only unpickler, not whatever other code added process-wide."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(list(allowed))
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


def _refused(name: str, exc: Exception) -> UnsafeCheckpointError:
    """The unpickler's reason in one line: usually the global the file wanted."""
    reason = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
    found = re.search(r"GLOBAL (\S+)", reason)
    what = f"the global {found.group(1)}" if found else f"something else ({reason[:200]})"
    return UnsafeCheckpointError(
        f"{name}: refused to load: it asks the unpickler for {what}, which DeepSpeed and the HF Trainer never "
        "write into a checkpoint, so the file was not written by them or was tampered with (loading it could run "
        "code). Do not use this checkpoint: delete it (locally and in storage), use another one (train.resume_from, "
        "vlmft merge --adapter), and find out who could write it"
    )


def safe_torch_load(f: Any, map_location: Any = None, **kwargs: Any) -> Any:
    """`torch.load` with weights_only=True (whatever the caller asked) and only the checkpoint allowlist.

    Same arguments as torch.load; raises UnsafeCheckpointError naming the file and the global it wanted.
    """
    kwargs["weights_only"] = True
    name = str(f) if isinstance(f, str | Path) else str(getattr(f, "name", f))
    with _only_globals(allowlist(Path(name).name == TRAINING_ARGS_FILE)):
        try:
            return _ORIGINAL_LOAD(f, map_location=map_location, **kwargs)
        except pickle.UnpicklingError as exc:
            raise _refused(name, exc) from None


def checkpoint_pickle_files(folder: str | Path) -> list[Path]:
    """Every torch.save file under a checkpoint folder (global_stepN/ shards included), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def check_checkpoint_files(folder: str | Path) -> list[Path]:
    """Read every pickle-based file of a checkpoint with safe_torch_load; returns the files checked.

    Memory-mapped (every file DeepSpeed and the Trainer write is in torch's zip format), so the check
    unpickles each file's object structure but does not read its tensor data: multi-GB optimizer shards
    cost a few page faults, not a full read (only a legacy, non-zip torch.save file is read in full).
    """
    files = checkpoint_pickle_files(folder)
    for path in files:
        safe_torch_load(path, map_location="cpu", mmap=zipfile.is_zipfile(path))
    return files


@contextlib.contextmanager
def torch_load_weights_only() -> Iterator[None]:
    """While active, every `torch.load` in this process is safe_torch_load, whatever weights_only it passes.

    A patch because there is no setting to ask for: DeepSpeed's checkpoint engine and zero_to_fp32 call
    `torch.load(..., weights_only=False)` themselves (and the Trainer's loads of rng_state / scheduler /
    optimizer files go through here too, with this allowlist instead of their own). They all look up
    `torch.load` when they call it, so replacing the attribute reaches them.
    """
    saved = torch.load, torch.serialization.load
    torch.load = torch.serialization.load = safe_torch_load
    try:
        yield
    finally:
        torch.load, torch.serialization.load = saved
