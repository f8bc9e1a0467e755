"""HF Trainer callbacks the training entry point installs.

`CheckpointCompleteCallback` writes `checkpoint_complete.json` into a checkpoint folder once the
Trainer's save has returned, which is what makes it count as complete for uploads and resume
(vlm_core.checkpoints). The Trainer calls `on_save` after `_save_checkpoint` on every rank; under
DeepSpeed that save ends with a barrier, so all ranks' shards are on disk by then.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from vlm_core.checkpoints import mark_complete


class CheckpointCompleteCallback(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                mark_complete(folder, state.global_step)
        return control
