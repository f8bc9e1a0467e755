"""Flow: distributed training from prepared shards (see vlm_core.train and tasks.train).

    vlmft train --config configs/demo.yaml train.nproc_per_node=2
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tasks.storage import load_storage_credentials
from tasks.train import train_task
from vlm_core.config import FinetuneConfig
from vlm_core.identity import compute_identity, with_run_dir
from vlm_core.preflight import preflight
from vlm_core.report import loss_summary


@flow(name="train")
def train(cfg: FinetuneConfig) -> dict:
    """Train the configured model on the configured shards; resume if a checkpoint exists."""
    if cfg.storage.url:
        load_storage_credentials(cfg)
    preflight(cfg, "train")  # settings, shards, model, output folder and storage, before any process starts
    cfg = with_run_dir(cfg, compute_identity(cfg))  # train.run_subdir: each identity gets a folder of its own
    summary = train_task(cfg)  # called directly: a cancellation must reach the subprocess owner
    losses = "".join(f"- {name}: {value}\n" for name, value in loss_summary(summary).items())
    create_markdown_artifact(
        f"# Training `{cfg.name}`\n\n- steps: {summary.get('global_step')} on {summary.get('world_size')} rank(s)\n"
        f"{losses}- output: `{cfg.train.output_dir}`\n",
        key="training-summary",
        description="What the training run did.",
    )
    return summary

