"""Command lines for the training subprocess, and the checks that must pass before launching it.

`python -m vlm_core.train --config run.json` is the one entry point; this module wraps it in the
launcher the config asks for: plain python (one process), torchrun (N processes per node, one or
several nodes with a static rendezvous at master_addr:master_port), or the deepspeed launcher
(N processes, or several nodes from `train.hostfile`, all started from this node over SSH:
vlm_core.multinode); train.launcher=slurm submits a batch job instead (vlm_core.slurm). Everything
that can be checked without starting processes is checked in `check_run`, so a bad config fails in a second, not after model loading;
`check_launch` is the part that needs no shards yet (run before the prepare step of a whole run).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch

from vlm_core.config import ConfigError, FinetuneConfig
from vlm_core.multinode import active_hosts, check_hostfile, is_multinode
from vlm_core.slurm import asks_for_gpus, check_slurm

DS_CONFIG_DIR = Path(__file__).with_name("ds_configs")


def world_size(cfg: FinetuneConfig) -> int:
    if is_multinode(cfg):
        return sum(active_hosts(cfg).values())
    return cfg.train.nproc_per_node * cfg.train.nnodes


def procs_per_node(cfg: FinetuneConfig) -> int:
    """Training processes on the busiest node."""
    return max(active_hosts(cfg).values()) if is_multinode(cfg) else cfg.train.nproc_per_node


def gradient_accumulation(cfg: FinetuneConfig) -> int:
    """Micro-batches per step: from train.global_batch_size when set, else as configured."""
    t = cfg.train
    if t.global_batch_size is None:
        return t.gradient_accumulation_steps
    per_step = t.per_device_batch_size * world_size(cfg)
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.per_device_batch_size "
            f"({t.per_device_batch_size}) x {world_size(cfg)} processes (train.nproc_per_node x train.nnodes, or "
            f"the slots of train.hostfile) = {per_step}; pick a multiple of {per_step}"
        )
    accum = t.global_batch_size // per_step
    if t.gradient_accumulation_steps not in (1, accum):
        raise ConfigError(
            f"train.gradient_accumulation_steps={t.gradient_accumulation_steps} contradicts train.global_batch_size="
            f"{t.global_batch_size} (which needs {accum}); set only one of them"
        )
    return accum


def deepspeed_config_path(cfg: FinetuneConfig) -> Path | None:
    if cfg.train.deepspeed == "none":
        return None
    return DS_CONFIG_DIR / f"{cfg.train.deepspeed}.json"


def check_launch(cfg: FinetuneConfig) -> None:
    """The launch settings and the model folder's config.json, with the key to fix in the message."""
    from vlm_core.model.load import check_model_source

    t = cfg.train
    if t.hostfile is not None:
        check_hostfile(cfg)
    if not t.shared_output_dir and not (cfg.storage.url and cfg.storage.upload_checkpoints):
        raise ConfigError("train.shared_output_dir=false: each node keeps its own checkpoint files, so they meet only "
                          "in storage; set storage.url (and storage.upload_checkpoints=true)")
    gradient_accumulation(cfg)
    if t.launcher == "slurm":
        check_slurm(cfg)
    # a Slurm job trains on the GPUs it asks for, not on this (login) machine's
    gpus = asks_for_gpus(cfg) if t.launcher == "slurm" else torch.cuda.is_available()
    on_cpu = "in a CPU-only Slurm job (no train.slurm.gpus_per_node)" if t.launcher == "slurm" else "on a CPU-only machine"
    if t.deepspeed == "zero3_offload" and not gpus:
        raise ConfigError(
            f"train.deepspeed=zero3_offload offloads GPU memory to the CPU and needs CUDA GPUs; {on_cpu} "
            "use train.deepspeed=zero3 (or zero2)"
        )
    if t.bf16 and not gpus and t.deepspeed != "none":
        raise ConfigError(f"train.bf16=true with DeepSpeed needs a GPU; {on_cpu} set train.bf16=false")
    if t.launcher == "deepspeed" and t.nnodes > 1:
        raise ConfigError("several nodes with train.launcher=deepspeed: list them in train.hostfile (started from "
                          "this node over SSH), or use train.launcher=torchrun with train.nnodes / node_rank on each node")
    if t.launcher == "python" and world_size(cfg) > 1:
        raise ConfigError(
            f"train.launcher=python starts one process but train.nproc_per_node x train.nnodes = {world_size(cfg)}; "
            "use train.launcher=torchrun or deepspeed"
        )
    check_model_source(cfg.model)  # a non-InternVL folder would otherwise fail in every rank


def check_run(cfg: FinetuneConfig) -> None:
    """Everything about a run that can fail before launch, with the key to fix in the message."""
    from vlm_core.data.manifest import read_manifest

    check_launch(cfg)
    manifest = read_manifest(cfg.data.shards)
    if manifest is None:
        raise ConfigError(
            f"data.shards={cfg.data.shards}: no manifest.json, so no complete shard set; run `vlmft prepare` first"
        )
    if manifest.train.samples == 0:
        raise ConfigError(f"data.shards={cfg.data.shards}: the manifest lists no training samples")


def thread_env(cfg: FinetuneConfig) -> dict[str, str]:
    """Environment for the training processes: threads split over the ranks of a node, no hub access."""
    cores = os.cpu_count() or 1
    env = {
        "OMP_NUM_THREADS": str(max(1, cores // procs_per_node(cfg))),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
    }
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    if "wandb" in cfg.logging.report_to:
        env["WANDB_PROJECT"] = cfg.logging.wandb_project
        env["WANDB_DIR"] = str(Path(cfg.train.output_dir).resolve())
        env["WANDB_MODE"] = "online" if cfg.logging.wandb_mode == "online" and os.environ.get("WANDB_API_KEY") else "offline"
    return env


def port_in_use(port: int) -> bool:
    """Whether a process on this machine listens on `port` (any address), as torch's rendezvous store would."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed run's TIME_WAIT does not count
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def free_port() -> int:
    """A TCP port no process on this machine listens on now (the system picks it)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def free_rendezvous_port(cfg: FinetuneConfig) -> tuple[FinetuneConfig, str | None]:
    """A one-node launch whose train.master_port is taken moves to a free port; returns the config
    to launch with and a line saying so (None when nothing moved).

    Two one-node runs on one machine (the nightly run and a manual one on the same worker, say) would
    both take the default 29500, and the second would die in torch's rendezvous with "address already
    in use" after loading everything. The port only has to be agreed between this node's own
    processes, so any free one does. Several nodes must agree on it: there it stays as configured."""
    t = cfg.train
    if t.launcher not in ("torchrun", "deepspeed") or t.nnodes > 1 or is_multinode(cfg) or not port_in_use(t.master_port):
        return cfg, None
    port = free_port()
    moved = cfg.model_copy(update={"train": t.model_copy(update={"master_port": port})})
    return moved, (f"train.master_port={t.master_port} is in use on this machine (another training run?); "
                   f"this one-node run meets its ranks on port {port} instead")


def command(cfg: FinetuneConfig, config_path: str | Path, python: str = sys.executable) -> list[str]:
    """The argv that starts training on this node."""
    t = cfg.train
    entry = ["-m", "vlm_core.train", "--config", str(config_path)]
    if t.launcher == "python":
        return [python, *entry]
    if t.launcher == "torchrun":
        return [python, "-m", "torch.distributed.run", f"--nproc_per_node={t.nproc_per_node}", f"--nnodes={t.nnodes}",
                f"--node_rank={t.node_rank}", f"--master_addr={t.master_addr}", f"--master_port={t.master_port}", *entry]
    return [python, "-m", "deepspeed.launcher.runner", f"--master_addr={t.master_addr}",
            f"--master_port={t.master_port}", f"--num_gpus={t.nproc_per_node}", "--module", "vlm_core.train",
            "--config", str(config_path)]
