"""The HF Trainer as an InternVL fine-tune needs it: our data, our loss normaliser, our callbacks.

* `VLMTrainer` trains on the streaming shard loader, which is already split by rank, so it returns
  it from `get_train_dataloader` without accelerate's `prepare` (which would re-split or broadcast
  it), and gives the loss the normaliser of the whole global batch (all micro-batches, all ranks)
  for InternVL's token / sample / square reductions.
* `CheckpointCompleteCallback` marks a checkpoint complete once the save has returned, which is
  what uploads and resume go by (vlm_core.checkpoints).
* `ProgressCallback` writes `metrics.jsonl` and the progress events the Prefect task reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from transformers import Trainer, TrainerCallback

from vlm_core.checkpoints import mark_complete
from vlm_core.data.loader import DataStats, ShardStream, make_dataloader
from vlm_core.model.loss import global_weight_total
from vlm_core.progress import emit


class VLMTrainer(Trainer):
    """Trainer with the shard streams as data and the global-batch normaliser for the loss.

    Each training batch's data counters are added to `stats` and its sample ids logged to
    `sample_log` (one JSON line per micro-batch), so a run shows what each rank trained on.
    """

    def __init__(self, *args, train_stream: ShardStream, eval_stream: ShardStream | None, reduction: str,
                 stats: DataStats, sample_log: IO[str], **kwargs):
        super().__init__(*args, train_dataset=train_stream, eval_dataset=eval_stream, **kwargs)
        self.train_stream, self.eval_stream, self.reduction = train_stream, eval_stream, reduction
        self.stats, self.sample_log = stats, sample_log
        self.model_accepts_loss_kwargs = False  # our loss function takes the normaliser, not the model

    def get_train_dataloader(self):
        dl = make_dataloader(self.train_stream)
        dl.set_epoch = self.train_stream.set_epoch  # the Trainer calls this at each epoch start
        return dl

    def get_eval_dataloader(self, eval_dataset=None):
        return make_dataloader(self.eval_stream)

    def _get_num_items_in_batch(self, batch_samples, device):
        # The Trainer's hook (transformers 5.24) for the loss normaliser of one optimizer step (and of
        # one eval batch); it counts supervised tokens, which is right only for the token reduction.
        if not batch_samples:
            return None
        return global_weight_total([b["labels"] for b in batch_samples], self.reduction).to(device)  # all-reduced

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        delta = inputs.pop("data_stats", None)
        ids = inputs.pop("sample_ids", None)
        if model.training and ids is not None:
            self.stats.add(delta or {})
            self.sample_log.write(json.dumps({"step": self.state.global_step, "ids": list(ids)}) + "\n")
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class CheckpointCompleteCallback(TrainerCallback):
    """Writes `checkpoint_complete.json` (with the run identity) once a checkpoint's save has returned.

    The Trainer calls `on_save` after `_save_checkpoint` on every rank; under DeepSpeed that save ends
    with a barrier, so all ranks' shards are on disk by then.
    """

    def __init__(self, identity: str | None = None):
        self.identity = identity

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                mark_complete(folder, state.global_step, self.identity)
        return control


class ProgressCallback(TrainerCallback):
    """Rank 0's `metrics.jsonl` and progress events: start, every log record, every checkpoint."""

    def __init__(self, stats: DataStats, sample_log: IO[str], resumed_from: Path | None):
        self.stats, self.sample_log, self.resumed_from = stats, sample_log, resumed_from

    def on_train_begin(self, args, state, control, **kwargs):
        emit("start", world_size=args.world_size, max_steps=state.max_steps, global_step=state.global_step,
             effective_batch=args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
             resumed_from=str(self.resumed_from) if self.resumed_from else None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, **logs, **self.stats.as_dict()}
        with open(Path(args.output_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        emit("log", max_steps=state.max_steps, **record)

    def on_save(self, args, state, control, **kwargs):
        self.sample_log.flush()
        emit("checkpoint", step=state.global_step, path=str(Path(args.output_dir) / f"checkpoint-{state.global_step}"))
