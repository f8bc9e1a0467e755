"""Where a single-process ZeRO-2 step spends its time, next to a plain PyTorch loop, at ~100 M parameters.

    .venv/bin/python benchmarks/zero2_bench.py [--steps 12] [--write-readme]

Every variant lives in ONE process and the variants take turns step by step on the same batches, so
load from other jobs on a shared machine hits them alike (separate processes run minutes apart
measured 1.5x swings here). Each variant has its own copy of the same seeded ~104 M-parameter InternVL
(the tiny model's geometry, wider and deeper), fp32 on CPU, batches of 4 one-image samples through
our preprocessing, gradient clipping at 1.0, lr 1e-4:

* plain: `loss.backward()`, `clip_grad_norm_`, torch AdamW (`fused=None`: the per-tensor for-loop on CPU);
* plain fused: the same with `AdamW(fused=True)`;
* zero2: `deepspeed.initialize` with vlm_core/ds_configs/zero2.json and a torch AdamW client optimizer
  (what the HF Trainer hands DeepSpeed), then `engine.backward` / `engine.step`; `fused` as above.

Reported per variant: the median over the steps after 2 warm-up steps of the whole step and of its
phases (forward, backward including DeepSpeed's gradient hooks and bucket copies, optimizer step
including clipping and DeepSpeed's flatten / master-weight copies), and the ratio to plain.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/vlm_zero2_bench")


def build_100m(folder: Path) -> None:
    """The tiny InternVL's tokenizer and geometry with a 512-wide 8-layer ViT and a 768-wide 12-layer Qwen2."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from vlm_core.model.tiny import build_tiny_model, build_tokenizer, tiny_config

    build_tiny_model(folder)  # tokenizer and processor configs; the weights are replaced below
    c = tiny_config(build_tokenizer()).to_dict()
    c["vision_config"].update(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048)
    c["text_config"].update(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                            intermediate_size=2048)
    c["text_config"].pop("layer_types", None)  # derived from num_hidden_layers again
    config = InternVLConfig(**c)
    config.dtype = "float32"
    torch.manual_seed(0)
    InternVLForConditionalGeneration(config).save_pretrained(folder)


def ds_config() -> dict:
    """Our zero2.json with the values the HF Trainer fills in for "auto" (fp32, clipping 1.0)."""
    cfg = json.loads((ROOT / "vlm_core" / "ds_configs" / "zero2.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=1,
               gradient_clipping=1.0, bf16={"enabled": False}, fp16={"enabled": False})
    return cfg


class Variant:
    def __init__(self, name: str, model_dir: Path, zero2: bool, fused: bool):
        import torch
        from transformers import InternVLForConditionalGeneration

        self.name, self.zero2 = name, zero2
        self.model = InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=fused or None)
        self.params = sum(p.numel() for p in self.model.parameters())
        if zero2:
            import deepspeed

            self.engine, self.opt, _, _ = deepspeed.initialize(model=self.model, optimizer=self.opt, config=ds_config())
        self.times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "step": []}
        self.losses: list[float] = []

    def step(self, batch: dict) -> None:
        import torch

        t0 = time.perf_counter()
        if self.zero2:
            loss = self.engine(**batch).loss
            t1 = time.perf_counter()
            self.engine.backward(loss)
            t2 = time.perf_counter()
            self.engine.step()
        else:
            self.opt.zero_grad(set_to_none=True)
            loss = self.model(**batch).loss
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
        t3 = time.perf_counter()
        for k, v in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2), ("step", t3 - t0)):
            self.times[k].append(v)
        self.losses.append(loss.item())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--variants", default="plain,plain_fused,zero2,zero2_fused")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed
    import torch
    from train_bench import batches

    model_dir = WORK / "m100"
    if not (model_dir / "model.safetensors").exists():
        build_100m(model_dir)
    deepspeed.init_distributed(dist_backend="gloo")
    data = batches(model_dir, args.steps, 4)
    variants = [Variant(v, model_dir, v.startswith("zero2"), v.endswith("_fused")) for v in args.variants.split(",")]
    for batch in data:  # turn by turn: each batch through every variant before the next batch
        for v in variants:
            v.step(batch)
    base = statistics.median(variants[0].times["step"][2:])
    rows = []
    for v in variants:
        med = {k: statistics.median(t[2:]) for k, t in v.times.items()}
        rows.append({"variant": v.name, **med, "ratio": med["step"] / base, "last_loss": v.losses[-1]})
    lines = ["## ZeRO-2 overhead at 100 M parameters (`benchmarks/zero2_bench.py`)", "",
             f"{variants[0].params / 1e6:.1f} M-parameter InternVL, fp32, CPU, 1 process, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; batches of 4 one-image samples; the variants alternate step by step "
             f"in one process; median of {args.steps - 2} steps after 2 warm-up steps.", "",
             "| variant | step (ms) | forward | backward | optimizer step | ratio vs plain | loss after last step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['step'] * 1000:.0f} | {r['forward'] * 1000:.0f} | {r['backward'] * 1000:.0f} "
                     f"| {r['optimizer'] * 1000:.0f} | {r['ratio']:.2f}x | {r['last_loss']:.4f} |")
    print("\n".join(lines))
    print("RESULT " + json.dumps(rows))
    if args.write_readme:
        from common import write_section

        write_section(lines[0], lines + [""])


if __name__ == "__main__":
    main()
