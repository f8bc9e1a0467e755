"""Full-weight HF Trainer + DeepSpeed run of the tiny InternVL, single process on CPU (for test_consolidate).

    python tests/scripts/train_zero3.py MODEL_DIR OUTPUT_DIR DS_CONFIG MAX_STEPS SAVE_STEPS

Writes checkpoint-N/ folders (marked complete like the training entry point does) and, after
training, the reference the consolidated checkpoint must reproduce: OUTPUT_DIR/final/ (every
parameter gathered across ZeRO-3 partitions, saved with save_pretrained) and
OUTPUT_DIR/final_logits.pt (logits of the trained model on a fixed batch).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

# One process without a launcher: DeepSpeed needs the torch.distributed env or it looks for MPI.
with socket.socket() as _s:
    _s.bind(("127.0.0.1", 0))
    _port = _s.getsockname()[1]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(_port), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (the helpers package)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root

import deepspeed  # noqa: E402
import torch  # noqa: E402
from transformers import InternVLForConditionalGeneration, Trainer, TrainingArguments  # noqa: E402

from helpers.batches import TinySamples, make_batch, pad_collate  # noqa: E402
from vlm_core.model.tiny import TILE_SIZE, TOKENS_PER_TILE  # noqa: E402
from vlm_core.train import close_process_group  # noqa: E402
from vlm_core.trainer import CheckpointCompleteCallback  # noqa: E402


def main(model_dir: str, output_dir: str, ds_config: str, max_steps: int, save_steps: int) -> None:
    from transformers import AutoTokenizer

    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=2, max_steps=max_steps,
                             learning_rate=1e-3, lr_scheduler_type="constant", save_strategy="steps",
                             save_steps=save_steps, logging_steps=1, report_to="none", use_cpu=True, seed=0,
                             data_seed=0, remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0,
                             optim="adamw_torch", deepspeed=ds_config)
    _ = args.device  # process group first, then deepspeed.comm, then from_pretrained (ZeRO-3 zero.Init)
    deepspeed.init_distributed(dist_backend="gloo")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    trainer = Trainer(model=model, args=args, train_dataset=TinySamples(tokenizer), data_collator=pad_collate,
                      callbacks=[CheckpointCompleteCallback()])
    trainer.train()
    assert trainer.is_deepspeed_enabled

    engine = trainer.model_wrapped
    batch = make_batch(tokenizer, TILE_SIZE, TOKENS_PER_TILE, n_samples=3, seed=7)
    engine.eval()
    with torch.no_grad():
        logits = engine(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.save({"logits": logits, "batch": batch}, Path(output_dir) / "final_logits.pt")
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.save_pretrained(Path(output_dir) / "final", state_dict=state)
    print(f"ZERO_STAGE {engine.zero_optimization_stage()} STEPS {trainer.state.global_step}", flush=True)
    close_process_group()  # gloo's threads stopped before exit, as a real run does


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
