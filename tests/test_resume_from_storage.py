"""Resume from storage with a real HF Trainer: the local folder is gone, training continues from the
newest complete checkpoint fetched from S3, at its step, with the same losses as an unbroken run."""

from __future__ import annotations

import shutil

import pytest
import s3fs
from transformers import InternVLForConditionalGeneration, Trainer, TrainingArguments

from helpers.batches import TinySamples, pad_collate
from vlm_core.checkpoints import COMPLETE_MARKER, fetch_latest_checkpoint, upload_new_checkpoints
from vlm_core.trainer import CheckpointCompleteCallback

pytestmark = pytest.mark.integration  # moto_server


def _train(model_dir, tokenizer, out, max_steps, resume=None):
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, max_steps=max_steps,
                             learning_rate=1e-3, lr_scheduler_type="constant", save_strategy="steps", save_steps=3,
                             logging_steps=1, report_to="none", use_cpu=True, seed=0, data_seed=0,
                             remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0)
    # Weights come from the checkpoint through from_pretrained, which maps the saved (original-format)
    # key names; HF Trainer's own resume loads the file with raw keys, matches none for InternVL in
    # transformers 5.24, and only warns. Trainer still restores optimizer, scheduler, RNG and step.
    model = InternVLForConditionalGeneration.from_pretrained(resume or model_dir)
    trainer = Trainer(model=model, args=args, train_dataset=TinySamples(tokenizer, 12), data_collator=pad_collate,
                      callbacks=[CheckpointCompleteCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}, trainer.state.global_step


def test_training_resumes_from_the_newest_checkpoint_in_storage(s3_server, tiny_model_dir, tokenizer, tmp_path):
    fs = s3fs.S3FileSystem()
    if not fs.exists("resume-bucket"):
        fs.mkdir("resume-bucket")
    full, _ = _train(tiny_model_dir, tokenizer, tmp_path / "full", 9)

    first = tmp_path / "machine1"
    _train(tiny_model_dir, tokenizer, first, 6)  # saves checkpoint-3 and checkpoint-6
    assert all((first / f"checkpoint-{s}" / COMPLETE_MARKER).is_file() for s in (3, 6))
    assert upload_new_checkpoints(first, "s3://resume-bucket", "run") == ["checkpoint-3", "checkpoint-6"]
    shutil.rmtree(first)  # the training machine is lost

    second = tmp_path / "machine2"
    ckpt = fetch_latest_checkpoint("s3://resume-bucket", "run", second)
    assert ckpt == second / "checkpoint-6"
    losses, step = _train(tiny_model_dir, tokenizer, second, 9, resume=str(ckpt))
    assert step == 9 and max(losses) == 9
    for s in (7, 8, 9):
        assert abs(losses[s] - full[s]) < 1e-5, (s, losses[s], full[s])
