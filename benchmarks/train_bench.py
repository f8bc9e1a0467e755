"""Per-step time: HF Trainer (+ DeepSpeed ZeRO-2 / ZeRO-3) vs a plain PyTorch loop, side by side.

    .venv/bin/python benchmarks/train_bench.py [--steps 30] [--size tiny|100m] [--optim adamw_torch_fused] [--write-readme]

Every variant runs in a fresh single-process subprocess on the same tiny InternVL and the same
pre-built batches (real images through our preprocessing), fp32 on CPU, torch AdamW (`--optim`: the
Trainer's optimizer name, also used by the plain loop: adamw_torch_fused makes both fused). `--size 100m`
uses the ~104 M-parameter InternVL of benchmarks/zero2_bench.py instead of the tiny one. Reported: the
median step time after 3 warm-up steps, its ratio to the plain loop, and the fixed start-up cost
(process start to the first step: imports, model load, engine set-up).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/vlm_train_bench")


def batches(model_dir: Path, n: int, bs: int):
    sys.path.insert(0, str(ROOT / "tests"))  # the tests' helpers package
    from transformers import AutoConfig, AutoTokenizer

    from helpers import data as D
    from vlm_core.config import DataConfig
    from vlm_core.data.collator import Collator, model_inputs
    from vlm_core.data.preprocess import make_preprocessor
    from vlm_core.data.sample import Turn

    tok = AutoTokenizer.from_pretrained(model_dir)
    pre = make_preprocessor(tok, DataConfig(max_dynamic_patch=4, max_seq_length=1024), AutoConfig.from_pretrained(model_dir))
    col = Collator(tok.pad_token_id, 8)
    out = []
    for b in range(n):
        samples = []
        for i in range(bs):
            k = b * bs + i
            turns = [Turn.model_validate(t) for t in D.conv(("human", "<image>\nWhat colour is it?"), ("gpt", f"Colour {k}."))]
            samples.append(pre(turns, [D.jpeg(96 + k % 5 * 16, 80, seed=k)], f"s{k}"))
        out.append(model_inputs(col(samples)))
    return out


def child(variant: str, steps: int, t_start: float, size: str, optim: str) -> None:
    import torch
    from transformers import InternVLForConditionalGeneration, Trainer, TrainerCallback, TrainingArguments

    model_dir = WORK / size
    data = batches(model_dir, steps, 4)
    times: list[float] = []
    first_step_at: list[float] = []
    if variant == "plain":
        torch.manual_seed(0)
        model = InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=optim == "adamw_torch_fused" or None)
        for b in data:
            t = time.perf_counter()
            first_step_at.append(time.time())
            opt.zero_grad()
            model(**b).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            times.append(time.perf_counter() - t)
    else:
        ds = None if variant == "trainer" else str(ROOT / "vlm_core" / "ds_configs" / f"{variant}.json")
        args = TrainingArguments(output_dir=str(WORK / variant), per_device_train_batch_size=1, max_steps=steps,
                                 learning_rate=1e-4, report_to="none", save_strategy="no", logging_steps=1000,
                                 use_cpu=True, deepspeed=ds, remove_unused_columns=False, disable_tqdm=True,
                                 optim=optim, dataloader_num_workers=0)
        if ds:
            import deepspeed

            _ = args.device
            deepspeed.init_distributed(dist_backend="gloo")
        model = InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)

        class Timer(TrainerCallback):
            def on_step_begin(self, *a, **k):
                self.t = time.perf_counter()
                first_step_at.append(time.time())

            def on_step_end(self, *a, **k):
                times.append(time.perf_counter() - self.t)

        class Fixed(torch.utils.data.Dataset):
            def __len__(self):
                return len(data)

            def __getitem__(self, i):
                return data[i]

        trainer = Trainer(model=model, args=args, train_dataset=Fixed(), data_collator=lambda items: items[0],
                          callbacks=[Timer()])
        trainer.train()
    print("RESULT " + json.dumps({"variant": variant, "median_s": statistics.median(times[3:]),
                                  "startup_s": first_step_at[0] - t_start}))


def run(variant: str, steps: int, size: str, optim: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    res = subprocess.run([sys.executable, __file__, "--child", variant, "--steps", str(steps), "--t0", str(time.time()),
                          "--size", size, "--optim", optim],
                         env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads([x for x in res.stdout.splitlines() if x.startswith("RESULT ")][-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--child")
    ap.add_argument("--t0", type=float)
    ap.add_argument("--size", choices=["tiny", "100m"], default="tiny")
    ap.add_argument("--optim", default="adamw_torch_fused", help="adamw_torch (per-tensor loop) or adamw_torch_fused")
    ap.add_argument("--variants", default="plain,trainer,zero2,zero3")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        child(args.child, args.steps, args.t0, args.size, args.optim)
        return
    from zero2_bench import build_100m

    from vlm_core.model.tiny import build_tiny_model

    if not (WORK / args.size / "model.safetensors").exists():
        (build_tiny_model if args.size == "tiny" else build_100m)(WORK / args.size)
    rows = [run(v, args.steps, args.size, args.optim) for v in args.variants.split(",")]
    base = rows[0]["median_s"]
    lines = ["## Training step time (`benchmarks/train_bench.py`)", "",
             f"{'Tiny' if args.size == 'tiny' else '104 M-parameter'} InternVL, fp32, CPU (2 cores), 1 process, "
             f"batches of 4 one-image samples (real JPEGs through our preprocessing), {args.optim}; median of "
             f"{args.steps - 3} steps after 3 warm-up steps; one run.", "",
             "| variant | median step (ms) | ratio vs plain loop | start-up to first step (s) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['median_s'] * 1000:.1f} | {r['median_s'] / base:.2f}x | {r['startup_s']:.1f} |")
    lines += ["", "Target: ZeRO-2 single process <= 1.15x the plain loop.", "",
              "Reproduce: `.venv/bin/python benchmarks/train_bench.py --write-readme`", ""]
    print("\n".join(lines))
    if args.write_readme:
        from common import write_section

        write_section("## Training step time", lines)


if __name__ == "__main__":
    main()
