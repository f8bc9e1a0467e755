"""The HF Trainer as an InternVL fine-tune needs it: our data, our loss normaliser, our callbacks.

* `VLMTrainer` trains on the streaming shard loader, which is already split by rank, so it returns
  it from `get_train_dataloader` without accelerate's `prepare` (which would re-split or broadcast
  it), and gives the loss the normaliser of the whole global batch (all micro-batches, all ranks)
  for InternVL's token / sample / square reductions (per original sample in a packed batch). Every log record (losses, evaluation) carries
  the data counters summed over all ranks and the samples/s since training started, so TensorBoard,
  W&B and `metrics.jsonl` see what the whole run read, not what rank 0 read.
* `GenerativeEval` (`eval.during_training`): every evaluation the Trainer runs also answers the first
  `eval.max_samples` held-out questions with the model being trained and adds exact match, token F1
  and ANLS to the eval metrics, next to eval_loss (the loss says how likely the reference answers
  are; these say whether the model now gives them).
* `CheckpointCompleteCallback` marks a checkpoint complete once the save has returned, which is
  what uploads and resume go by (vlm_core.checkpoints); `RankUploadCallback` uploads each rank's own
  files when the nodes share no folder (vlm_core.rank_checkpoints).
* `ProgressCallback` writes `metrics.jsonl` and the progress events the Prefect task reads: a step
  event every `logging.progress_seconds` (step/total, samples/s, tokens/s, ETA, latest loss), and a
  phase event when evaluation starts, so a user is never left without news for long.
* `RunConfigCallback` puts the whole `FinetuneConfig` in W&B's run config and in TensorBoard as text:
  the Trainer's own callbacks record only its TrainingArguments and the model config.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

from transformers import Trainer, TrainerCallback

from vlm_core.checkpoints import mark_complete
from vlm_core.data.loader import DataStats, ShardStream, make_dataloader
from vlm_core.data.preprocess import Preprocessor
from vlm_core.evaluate import evaluate
from vlm_core.infer import Predictor, Question
from vlm_core.model.loss import global_weight_total, vlm_loss
from vlm_core.progress import emit


@dataclass
class GenerativeEval:
    """Held-out questions answered (greedy) by the model being trained, scored overall.

    Every rank answers all the questions, in lockstep, and computes the same scores; the Trainer's
    main process alone writes them (its `log` callbacks). Splitting the questions across ranks would
    be faster, but under ZeRO-3 each forward pass is a collective (the layers' weights are gathered
    from all ranks), so every rank must make the same number of forward passes: uneven shares or
    answers of different lengths would hang the run. With the same questions, weights and batches on
    every rank, the ranks make the same calls, and `generate` itself keeps stepping until every rank
    has finished (transformers' `synced_gpus`, on by default under ZeRO-3), so a rank whose answer
    ended early still joins the others' gathers. Under ZeRO-1/2 and DDP generation makes no collective
    at all. The cost is that of one rank answering `eval.max_samples` questions.

    Generation leaves training as it was: the model's train/eval mode is restored, no gradients are
    kept, the random number generators' state is restored (greedy decoding draws none, but the next
    training step's dropout must not depend on whether this ran), and the model config's `use_cache`
    is not touched (vlm_core.infer passes it to `generate`)."""

    questions: list[Question]
    preprocessor: Preprocessor  # the training one: the same template, tiling and image tokens
    max_new_tokens: int
    batch_size: int

    def run(self, model: Any, tokenizer: Any, device: Any, step: int) -> dict[str, float]:
        """{exact_match, f1, anls (overall, 0..1), generation_runtime (seconds)} of `model` (unwrapped: the
        module itself, or the peft model with LoRA)."""
        import torch

        emit("phase", phase=f"answering {len(self.questions)} held-out questions (generative evaluation) at step {step}")
        was_training = model.training
        model.eval()
        cuda = [device] if getattr(device, "type", "cpu") == "cuda" else []
        try:
            with torch.random.fork_rng(devices=cuda):
                result = evaluate(Predictor.from_model(model, tokenizer, self.preprocessor, device), self.questions,
                                  self.max_new_tokens, self.batch_size)
        finally:
            model.train(was_training)
        overall = result.metrics["overall"]
        return {"exact_match": overall["exact_match"], "f1": overall["f1"], "anls": overall["anls"],
                "generation_runtime": round(result.seconds, 4)}


class VLMTrainer(Trainer):
    """Trainer with the shard streams as data and the global-batch normaliser for the loss.

    Each training batch's data counters are added to `stats` (this rank's) and logged with its sample
    ids to `sample_log` (one JSON line per micro-batch), so a run shows what each rank trained on.
    With `generative_eval`, each evaluation also logs `eval_exact_match`, `eval_f1`, `eval_anls` and
    `eval_generation_runtime` in the same record as `eval_loss` (`eval/exact_match` ... in TensorBoard
    and W&B, whose callbacks turn the `eval_` prefix into `eval/`).
    """

    def __init__(self, *args, train_stream: ShardStream, eval_stream: ShardStream | None, reduction: str,
                 stats: DataStats, sample_log: IO[str], generative_eval: GenerativeEval | None = None, **kwargs):
        self.train_stream, self.eval_stream, self.reduction = train_stream, eval_stream, reduction
        self.stats, self.sample_log, self.generative_eval = stats, sample_log, generative_eval
        self._sample_index = None  # the current packed batch's per-token sample, for the loss
        super().__init__(*args, train_dataset=train_stream, eval_dataset=eval_stream,
                         compute_loss_func=self._loss, **kwargs)
        self.model_accepts_loss_kwargs = False  # our loss function takes the normaliser, not the model

    def _loss(self, outputs, labels, num_items_in_batch=None):
        """InternVL's reduction over the global batch; per original sample in a packed batch."""
        return vlm_loss(outputs.logits, labels, self.reduction, normalizer=num_items_in_batch,
                        sample_index=self._sample_index)

    def get_train_dataloader(self):
        dl = make_dataloader(self.train_stream)
        dl.set_epoch = self.train_stream.set_epoch  # the Trainer calls this at each epoch start
        return dl

    def get_eval_dataloader(self, eval_dataset=None):
        return make_dataloader(self.eval_stream)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        # The Trainer's `evaluate` logs this output's metrics, so the generative scores join eval_loss in
        # one record, at every evaluation (eval_steps, eval_on_start, the final one).
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.generative_eval is not None:
            scores = self.generative_eval.run(self.model, self.processing_class, self.args.device, self.state.global_step)
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in scores.items()})
        return output

    def _get_num_items_in_batch(self, batch_samples, device):
        # The Trainer's hook (transformers 5.24) for the loss normaliser of one optimizer step (and of
        # one eval batch); it counts supervised tokens, which is right only for the token reduction.
        if not batch_samples:
            return None
        return global_weight_total([(b["labels"], b.get("sample_index")) for b in batch_samples],
                                   self.reduction).to(device)  # all-reduced

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        delta = inputs.pop("data_stats", None)
        ids = inputs.pop("sample_ids", None)
        self._sample_index = inputs.pop("sample_index", None)  # packed batches only; the model does not take it
        if model.training and ids is not None:
            self.stats.add(delta or {})
            self.sample_log.write(json.dumps({"step": self.state.global_step, "ids": list(ids), "stats": delta or {}}) + "\n")
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def summed_stats(self) -> DataStats:
        """The data counters of all ranks added up. A collective: every rank must call it at the same point."""
        import torch
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return DataStats().add(self.stats)
        names = [f.name for f in fields(DataStats)]
        counts = torch.tensor([getattr(self.stats, n) for n in names], dtype=torch.int64, device=self.args.device)
        dist.all_reduce(counts)
        return DataStats(**dict(zip(names, counts.tolist(), strict=True)))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Every rank logs at the same points (the Trainer gathers the loss or the eval metrics just
        # before), so the counters can be summed here, for every tracker at once.
        summed = self.summed_stats()
        logs.update(summed.as_dict())
        if start_time is not None:
            logs["train_samples_per_second"] = round(summed.samples / max(time.time() - start_time, 1e-9), 3)
        super().log(logs, start_time)


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


class RankUploadCallback(TrainerCallback):
    """Every rank hands each checkpoint it saved to its uploader (train.shared_output_dir=false: each node
    uploads its own files; vlm_core.rank_checkpoints). After CheckpointCompleteCallback, so rank 0's
    upload includes the completion marker."""

    def __init__(self, uploader):
        self.uploader = uploader

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            self.uploader.submit(folder)
        return control


class ProgressCallback(TrainerCallback):
    """Rank 0's `metrics.jsonl` and progress events: start, a step event every `every_s` seconds (and
    at the first and last step), evaluation starting, every log record, every checkpoint.

    Rates are measured over the steps since the previous step event, less the time spent evaluating
    in between; the ETA over all steps of this session, evaluations included.
    Tokens are the non-padding tokens of all ranks (the Trainer's `num_input_tokens_seen`).
    """

    def __init__(self, sample_log: IO[str], resumed_from: Path | None, every_s: float = 3.0):
        self.sample_log, self.resumed_from, self.every_s = sample_log, resumed_from, every_s
        self.window = (0.0, 0, 0)  # (time, step, tokens) at the last step event: rates are over the steps since
        self.paused = 0.0  # seconds of evaluation within the window (no training, so not in the rates)
        self.eval_began: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self.began, self.first_step = time.monotonic(), state.global_step
        self.window = (self.began, state.global_step, state.num_input_tokens_seen)
        emit("start", world_size=args.world_size, max_steps=state.max_steps, global_step=state.global_step,
             effective_batch=self.batch, resumed_from=str(self.resumed_from) if self.resumed_from else None)

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        since, step0, tokens0 = self.window
        due = now - since >= self.every_s or state.global_step in (self.first_step + 1, state.max_steps)
        if not state.is_world_process_zero or not due or state.global_step == step0:
            return
        seconds = max(now - since - self.paused, 1e-9)
        done = state.global_step - self.first_step
        logged = next((h for h in reversed(state.log_history) if "loss" in h), {})
        emit("step", step=state.global_step, max_steps=state.max_steps,
             samples_per_s=(state.global_step - step0) * self.batch / seconds,
             tokens_per_s=(state.num_input_tokens_seen - tokens0) / seconds,
             eta_s=(now - self.began) / done * (state.max_steps - state.global_step),
             loss=logged.get("loss"), loss_step=logged.get("step"))
        self.window, self.paused = (now, state.global_step, state.num_input_tokens_seen), 0.0

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.eval_began is None:
            self.eval_began = time.monotonic()
            emit("phase", phase=f"evaluating on the held-out samples at step {state.global_step}")

    def on_evaluate(self, args, state, control, **kwargs):
        if self.eval_began is not None:
            self.paused += time.monotonic() - self.eval_began
            self.eval_began = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, **logs}
        with open(Path(args.output_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        emit("log", max_steps=state.max_steps, **record)

    def on_save(self, args, state, control, **kwargs):
        self.sample_log.flush()
        emit("checkpoint", step=state.global_step, path=str(Path(args.output_dir) / f"checkpoint-{state.global_step}"))


class RunConfigCallback(TrainerCallback):
    """The whole run config in the trackers: W&B's run config (one key per section, so `data.max_dynamic_patch`
    is a config field there) and a TensorBoard text summary `vlmft_config` (the YAML, at step 0).

    Runs after the Trainer's tracker callbacks (callbacks passed to the Trainer come after its own), so
    the W&B run and the TensorBoard writer exist by then; `tensorboard` is the Trainer's callback that
    holds the writer, or None without TensorBoard."""

    def __init__(self, config: dict[str, Any], config_yaml: str, report_to: list[str], tensorboard=None):
        self.config, self.config_yaml, self.report_to, self.tensorboard = config, config_yaml, report_to, tensorboard

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if "wandb" in self.report_to:
            import wandb

            if wandb.run is not None:
                wandb.run.config.update(self.config, allow_val_change=True)
        writer = getattr(self.tensorboard, "tb_writer", None)
        if writer is not None:
            writer.add_text("vlmft_config", "".join(f"    {line}\n" for line in self.config_yaml.splitlines()), 0)
            writer.flush()
