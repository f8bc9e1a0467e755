"""Batched generation (batch 8) vs one question at a time, side by side, on the demo model and data.

    .venv/bin/python benchmarks/eval_bench.py [--questions 48] [--repeats 3] [--max-new-tokens 32]
        [--device cpu|cuda] [--dtype float32|bfloat16] [--threads N] [--json out.json] [--no-readme]

The tiny random InternVL (`vlmft tiny-model`) answers the first --questions samples of the generated
demo data set (`vlmft demo-data`: single-image, two-image and text-only questions) with
`vlm_core.infer.Predictor` and the demo run's preprocessing (data.max_dynamic_patch=2,
data.max_seq_length=512), greedy, --max-new-tokens each. The random model never says <|im_end|>, so
every question generates all its tokens in both variants: the same work, only the batching differs.
Variants alternate; each is timed after one warm-up, best of --repeats. Also checks that both give the
same answers. Reported: samples/s of each and batched ÷ one-at-a-time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from common import write_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from vlm_core.config import DataConfig
from vlm_core.demo import write_demo_data
from vlm_core.infer import load_predictor, questions_from_meta
from vlm_core.model.tiny import build_tiny_model

DEMO_DATA = DataConfig(max_dynamic_patch=2, max_seq_length=512)  # configs/demo.yaml


def timed(predictor, questions, max_new_tokens: int, batch_size: int) -> tuple[float, list[str]]:
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    answers = predictor.predict(questions, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        meta = write_demo_data(Path(tmp) / "data", n=args.questions)
        model = build_tiny_model(Path(tmp) / "tiny")
        questions = questions_from_meta(str(meta), max_samples=args.questions)
        predictor = load_predictor(str(model), data=DEMO_DATA, dtype=args.dtype, device=args.device)
        kinds = {"text-only": sum(not q.images for q in questions), "one image": sum(len(q.images) == 1 for q in questions),
                 "two images": sum(len(q.images) == 2 for q in questions)}
        for size in (args.batch_size, 1):  # warm-up: kernels, allocator, tokenizer caches
            timed(predictor, questions[: 2 * size], args.max_new_tokens, size)
        best = {args.batch_size: float("inf"), 1: float("inf")}
        answers = {}
        for _ in range(args.repeats):
            for size in best:
                seconds, answers[size] = timed(predictor, questions, args.max_new_tokens, size)
                best[size] = min(best[size], seconds)
    n = len(questions)
    result = {
        "questions": n, "kinds": kinds, "max_new_tokens": args.max_new_tokens, "device": str(predictor.device),
        "dtype": args.dtype, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "batched_seconds": best[args.batch_size], "single_seconds": best[1],
        "batched_samples_per_s": n / best[args.batch_size], "single_samples_per_s": n / best[1],
        "ratio": best[1] / best[args.batch_size], "same_answers": answers[args.batch_size] == answers[1],
        "differing_answers": sum(a != b for a, b in zip(answers[args.batch_size], answers[1], strict=True)),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.no_readme:
        return
    where = f"{result['device']}, {args.dtype}, {platform.processor() or platform.machine()}, {result['cpus']} CPU(s)"
    write_section("## Batched generation vs one question at a time", [
        "## Batched generation vs one question at a time (benchmarks/eval_bench.py)",
        "",
        "```bash",
        f".venv/bin/python benchmarks/eval_bench.py --questions {n} --repeats {args.repeats}"
        + (f" --threads {args.threads}" if args.threads else "") + "   # --device cuda --dtype bfloat16 --json",
        "```",
        "",
        f"The tiny random InternVL answers the first {n} questions of the generated demo data set "
        f"({kinds['text-only']} text-only, {kinds['one image']} with one image, {kinds['two images']} with two) "
        f"with `vlm_core.infer.Predictor` and the demo run's preprocessing, greedy, {args.max_new_tokens} new tokens "
        "each (the random model never says `<|im_end|>`, so both variants generate the same number of tokens). "
        f"Batches of {args.batch_size}, left-padded, against one question at a time; alternating, after a warm-up, "
        f"best of {args.repeats}.",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} ({where}):",
        "",
        "| variant | seconds | samples/s | batched ÷ one at a time | target |",
        "|---|---|---|---|---|",
        f"| batch {args.batch_size} | {best[args.batch_size]:.2f} | {result['batched_samples_per_s']:.1f} | "
        f"**{result['ratio']:.2f}×** | ≥ 3× ({'met' if result['ratio'] >= 3 else 'missed'}) |",
        f"| one at a time | {best[1]:.2f} | {result['single_samples_per_s']:.1f} | | |",
        "",
        f"Same answers in both variants: {'yes' if result['same_answers'] else 'no'} "
        f"({result['differing_answers']} of {n} differ).",
        "",
    ])


if __name__ == "__main__":
    main()
