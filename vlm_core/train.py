"""The training entry point: `python -m vlm_core.train --config run.json`.

Run it under torchrun or the deepspeed launcher (vlm_core.launch builds the command line), or alone.
HF Trainer does the optimisation; this module supplies what an InternVL fine-tune needs around it:

* TrainingArguments and the DeepSpeed config derived from the one `FinetuneConfig`. On a CPU-only
  machine `use_cpu=True` is required, or the Trainer does not see the other ranks (2 ranks then
  either fail its batch-size check or, silently, both train as rank 0 on the same batches), and
  ZeRO-3 needs `deepspeed.init_distributed("gloo")` before the model is built.
* The streaming shard loader, already split by rank (its micro-batches packed into rows with
  train.packing, vlm_core.data.packing), and the loss with InternVL's token / sample / square
  reductions normalised over the global batch of each optimizer step (vlm_core.trainer).
* Checkpoints that count only once complete (`checkpoint_complete.json`), and resume from the newest
  complete one with the data position restored: the loader continues after the last sample the
  checkpoint trained on instead of replaying the epoch.
* Rank-0 progress events (vlm_core.progress) for the Prefect task: each start-up phase as it begins
  (imports, run folder, ranks, model, data), then progress every few seconds while training.
  `metrics.jsonl` in the run folder, and per-rank sample logs (ids and data counters of every
  micro-batch) so a run can show which samples each rank trained on.
* With `eval.during_training`, every evaluation also answers held-out questions and logs exact match,
  F1 and ANLS next to eval_loss (vlm_core.trainer.GenerativeEval).
* The whole config in the trackers (W&B run config, TensorBoard text), with the data counters summed
  over ranks, tokens/s and samples/s in every log record (vlm_core.trainer).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path

from vlm_core.progress import emit, error_line


def _single_process_env() -> None:
    """A bare `python -m vlm_core.train` with DeepSpeed needs the variables a launcher would set."""
    if "RANK" in os.environ:
        return
    from vlm_core.launch import free_port

    port = free_port()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def deepspeed_config(cfg) -> str | dict | None:
    """The shipped ZeRO config's path; without a shared folder, its contents with the model states saved
    on every node too (DeepSpeed writes them on global rank 0 only otherwise; every rank reads them on resume)."""
    from vlm_core.launch import deepspeed_config_path

    path = deepspeed_config_path(cfg)
    if path is None or cfg.train.shared_output_dir:
        return str(path) if path else None
    ds = json.loads(path.read_text())
    ds["checkpoint"] = {**ds.get("checkpoint", {}), "use_node_local_storage": True}
    return ds


def training_arguments(cfg, use_cpu: bool):
    from transformers import TrainingArguments

    from vlm_core.launch import gradient_accumulation

    t = cfg.train
    ds = deepspeed_config(cfg)
    return TrainingArguments(
        output_dir=t.output_dir,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=gradient_accumulation(cfg),
        max_steps=t.max_steps,
        num_train_epochs=t.num_epochs,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        bf16=t.bf16,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        eval_on_start=t.eval_on_start,
        report_to=list(cfg.logging.report_to) or "none",
        run_name=cfg.name,
        deepspeed=ds,
        save_on_each_node=not t.shared_output_dir,  # trainer state, scheduler, adapter and rotation on every node
        use_cpu=use_cpu,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        ignore_data_skip=True,  # the loader restores the data position itself, without replaying batches
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",  # tokens/s in the logs and the progress events (all ranks)
        # One fused AdamW kernel (CPU and CUDA) instead of ~10 elementwise passes per tensor: on CPU it makes
        # the optimizer step ~3x faster at 100 M parameters, and under ZeRO-2 it runs on the flat fp32 partition
        # (benchmarks/README.md, "ZeRO-2 overhead"). The update is the same AdamW, to float rounding.
        optim="adamw_torch_fused",
    )


def build_trainer(cfg, targs, model, tokenizer, resume: Path | None, identity: str | None = None, uploader=None):
    """The Trainer wired to the shard streams (restored to the resume point), our loss and callbacks."""
    from transformers.integrations import TensorBoardCallback

    from vlm_core.config import to_yaml
    from vlm_core.data.collator import Collator
    from vlm_core.data.loader import DataStats, ShardStream
    from vlm_core.data.manifest import read_manifest
    from vlm_core.data.preprocess import make_preprocessor
    from vlm_core.infer import questions_from_shards
    from vlm_core.trainer import (
        CheckpointCompleteCallback,
        GenerativeEval,
        ProgressCallback,
        RankUploadCallback,
        RunConfigCallback,
        VLMTrainer,
    )

    preprocess = make_preprocessor(tokenizer, cfg.data, model.config)
    collate = Collator(tokenizer.pad_token_id, cfg.data.pad_to_multiple_of)  # evaluation: unpacked, comparable
    pack = (cfg.train.pack_max_tokens, cfg.train.pack_max_tiles) if cfg.train.packing else None
    train_collate = Collator(tokenizer.pad_token_id, cfg.data.pad_to_multiple_of,
                             pack_max_tokens=pack[0] if pack else None, pack_max_tiles=pack[1] if pack else None)
    stream_kw = dict(batch_size=cfg.train.per_device_batch_size, seed=cfg.train.seed, num_workers=cfg.data.num_workers)
    train_stream = ShardStream.from_folder(cfg.data.shards, preprocess, train_collate, "train",
                                           shuffle_buffer=cfg.data.shuffle_buffer, shuffle_shards=cfg.data.shuffle_shards,
                                           pack=pack, **stream_kw)
    eval_stream, generative_eval = None, None
    if read_manifest(cfg.data.shards).eval.samples:
        eval_stream = ShardStream.from_folder(cfg.data.shards, preprocess, collate, "eval", shuffle_buffer=0,
                                              shuffle_shards=False, **stream_kw)
        if cfg.eval.during_training:  # read once; every rank answers the same questions (vlm_core.trainer)
            generative_eval = GenerativeEval(questions_from_shards(cfg.data.shards, cfg.eval.max_samples), preprocess,
                                             cfg.eval.max_new_tokens, cfg.eval.batch_size)
    else:  # no held-out shards: nothing to evaluate on
        targs.eval_strategy = "no"
        targs.eval_on_start = False
    if resume is not None:
        step = json.loads((resume / "trainer_state.json").read_text())["global_step"]
        train_stream.load_state(train_stream.state_after(step * targs.gradient_accumulation_steps))

    samples_dir = Path(cfg.train.output_dir) / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    sample_log = open(samples_dir / f"rank{_rank()}.jsonl", "a")
    stats = DataStats()
    reduction = cfg.train.loss_reduction
    trainer = VLMTrainer(
        model=model, args=targs, processing_class=tokenizer, train_stream=train_stream, eval_stream=eval_stream,
        reduction=reduction, stats=stats, sample_log=sample_log, generative_eval=generative_eval,
        callbacks=[CheckpointCompleteCallback(identity), ProgressCallback(sample_log, resume, cfg.logging.progress_seconds)],
    )
    if uploader is not None:
        trainer.add_callback(RankUploadCallback(uploader))
    tensorboard = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)), None)
    trainer.add_callback(RunConfigCallback(cfg.model_dump(mode="json"), to_yaml(cfg), list(cfg.logging.report_to),
                                           tensorboard))
    return trainer, stats, sample_log


def final_evaluation(trainer, targs) -> dict:
    """The eval metrics of the final model: those of the last step when training evaluated there
    already (max_steps a multiple of eval_steps), else a new evaluation. Evaluating the same weights
    twice would cost an eval pass and log (and report) the final eval twice."""
    if targs.eval_strategy == "no":
        return {}
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return last
    return trainer.evaluate()


def run(cfg) -> dict:
    """Train as configured; returns (on every rank) a small summary."""
    import torch

    from vlm_core.checkpoints import resolve_resume, run_url
    from vlm_core.identity import claim_run_folder, compute_identity, with_run_dir
    from vlm_core.launch import check_run
    from vlm_core.model import build_for_training
    from vlm_core.model.load import load_tokenizer
    from vlm_core.rank_checkpoints import RankUploader, launch_token, resume_from_storage
    from vlm_core.safe_load import check_checkpoint_files, torch_load_weights_only

    t0 = time.time()
    emit("phase", phase="checking the run folder, data and base model")
    identity = compute_identity(cfg)  # every rank: the same settings, data and model give the same hash
    cfg = with_run_dir(cfg, identity)
    if _rank() == 0:  # refuses a folder of another run before anything is written to it
        identity = claim_run_folder(cfg, identity)
    check_run(cfg)
    use_cpu = not torch.cuda.is_available()
    emit("phase", phase="setting up the ranks" + (" and DeepSpeed" if cfg.train.deepspeed != "none" else ""))
    targs = training_arguments(cfg, use_cpu)
    _ = targs.device  # accelerate sets up the process group here
    if targs.deepspeed and use_cpu:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    uploader = None
    if cfg.train.shared_output_dir or cfg.train.resume_from != "auto":
        resume = resolve_resume(cfg.train.resume_from, cfg.train.output_dir, identity.id)
    else:  # each node holds its own files: the newest checkpoint complete on every node is in storage
        resume = resume_from_storage(cfg.storage.url, identity.run_id(cfg.name), Path(cfg.train.output_dir), _rank(),
                                     int(os.environ.get("LOCAL_RANK", 0)))
    if not cfg.train.shared_output_dir:
        uploader = RankUploader(run_url(cfg.storage.url, identity.run_id(cfg.name)), _rank(), targs.world_size,
                                launch_token(_rank()))
    if resume is not None:  # a crafted pickle in it fails here, naming the file, before anything reads it
        check_checkpoint_files(resume)
    emit("phase", phase=f"loading the model from {cfg.model.path}")
    tokenizer = load_tokenizer(cfg.model)
    # A full-weight run without DeepSpeed takes its weights from the checkpoint through from_pretrained:
    # the Trainer's own loader reads the saved (original-format) InternVL keys raw, matches none and only
    # warns. DeepSpeed and LoRA resumes restore the weights themselves.
    weights = resume if resume is not None and cfg.train.deepspeed == "none" and not cfg.lora.enabled else None
    model = build_for_training(cfg, weights_from=weights)
    emit("phase", phase="opening the shards and setting up the optimizer" + (" (DeepSpeed)" if targs.deepspeed else ""))
    trainer, stats, sample_log = build_trainer(cfg, targs, model, tokenizer, resume, identity.id, uploader)
    with torch_load_weights_only():  # DeepSpeed's own resume loads ask for weights_only=False
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    final_eval = final_evaluation(trainer, targs)
    emit("phase", phase="saving the final model")
    trainer.save_model(str(Path(cfg.train.output_dir) / "final"))  # every rank: ZeRO-3 gathers the weights
    sample_log.close()
    if uploader is not None:
        emit("phase", phase="uploading the last checkpoint files of every rank")
        uploader.close()
        for error in uploader.errors:
            print(f"rank {_rank()}: checkpoint upload given up: {error}", flush=True)
    history = trainer.state.log_history
    summary = {
        "identity": identity.id,
        "run_id": identity.run_id(cfg.name),
        "output_dir": cfg.train.output_dir,
        "parent": identity.parent,
        "world_size": targs.world_size,
        "global_step": trainer.state.global_step,
        "resumed_from": str(resume) if resume else None,
        "train_loss": result.training_loss,
        "losses": {str(h["step"]): h["loss"] for h in history if "loss" in h},
        "eval_losses": {str(h["step"]): h["eval_loss"] for h in history if "eval_loss" in h},
        "final_eval_loss": final_eval.get("eval_loss"),
        "data": trainer.summed_stats().as_dict(),  # every rank: a collective
        "seconds": round(time.time() - t0, 1),
    }
    if trainer.is_world_process_zero():
        (Path(cfg.train.output_dir) / "run_summary.json").write_text(json.dumps(summary, indent=1))
    emit("done", **summary)
    close_process_group()
    return summary


def close_process_group() -> None:
    """End the ranks' process group once every rank has finished.

    Without it, gloo's worker threads are still alive while the interpreter shuts down, and a
    rank can abort at exit ("terminate called without an active exception", SIGABRT) after a
    run that trained and saved correctly; the launcher then reports the whole run as failed.
    Called only on success: after an error the other ranks may never reach the barrier.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from vlm_core.config import ConfigError, from_json, load_config
    from vlm_core.multinode import CONFIG_ENV

    parser = argparse.ArgumentParser(prog="python -m vlm_core.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config: JSON (as written by the launcher) or YAML")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("--vlmft_launch", default=None, help=argparse.SUPPRESS)  # marks a hostfile launch's processes
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_args(argv)
    _single_process_env()
    emit("phase", phase="starting: importing torch, transformers and DeepSpeed")
    try:
        if CONFIG_ENV in os.environ:  # a hostfile launch: the head node's run.json, which this node may not see
            cfg = from_json(base64.b64decode(os.environ[CONFIG_ENV]).decode(), args.config)
        elif args.config.endswith(".json") and not args.overrides:
            cfg = from_json(Path(args.config).read_text(), args.config)
        else:
            cfg = load_config(args.config, args.overrides)
        run(cfg)
    except Exception as exc:
        print(error_line(exc), flush=True)  # the launching task names the first failing rank from this line
        if not isinstance(exc, ConfigError):
            raise  # the traceback follows in the log
        print(f"vlm_core.train: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
