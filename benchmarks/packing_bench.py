"""Padding and useful tokens/s: packed (`train.packing`) vs padded micro-batches, side by side in one run.

    .venv/bin/python benchmarks/packing_bench.py [--samples 400] [--batch 8] [--steps 30] [--llm-width 512]

The demo data mix (`vlm_core/demo.py`: colour questions on one- or two-tile images, shape questions,
two-image comparisons and text-only samples) preprocessed as the demo trains it (data.max_dynamic_patch=2,
data.max_seq_length=512, pad_to_multiple_of=8), shuffled with a fixed seed, cut into micro-batches of
--batch samples, and collated twice: padded to the longest sample (today's collator) and packed
(pack_max_tokens 512 = the demo's max_seq_length, pack_max_tiles 64). Both variants train the same
micro-batches on the tiny InternVL (fp32, sdpa, CPU, one torch thread, vision encoder frozen as in the
demo, AdamW), or with --llm-width N on a random copy whose language model is N wide and 4 layers deep;
the variants take turns step by step so a noisy machine slows them alike. Reported:

* padding: the share of the batch tensor's positions (rows x width) that hold no sample token;
* useful tokens/s: the samples' own tokens (the dummy tile span of a text-only sample not counted)
  per second of forward + backward + optimizer step, from the median (and the fastest) of --steps
  steps; and supervised tokens/s (tokens with a label);
* the ratio packed / padded of each.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def demo_samples(folder: Path, n: int, seed: int):
    """The demo mix, preprocessed as the demo config does; returns (tokenizer, model folder, samples)."""
    from transformers import AutoConfig, AutoTokenizer

    from vlm_core.config import DataConfig
    from vlm_core.data.preprocess import make_preprocessor
    from vlm_core.data.reference import ReferenceDataset
    from vlm_core.demo import write_demo_data
    from vlm_core.model.tiny import build_tiny_model

    model_dir = build_tiny_model(folder / "tiny")
    meta_path = write_demo_data(folder / "data", n=n)
    tok = AutoTokenizer.from_pretrained(model_dir)
    pre = make_preprocessor(tok, DataConfig(max_dynamic_patch=2, max_seq_length=512), AutoConfig.from_pretrained(model_dir))
    samples = []
    for entry in json.loads(meta_path.read_text()).values():
        ds = ReferenceDataset(str(meta_path.parent / entry["annotation"]), str(meta_path.parent / entry["root"]), pre,
                              entry.get("max_dynamic_patch"))
        samples += [ds[i] for i in range(len(ds))]
    random.Random(seed).shuffle(samples)
    return tok, model_dir, samples


def make_model(model_dir: Path, llm_width: int):
    """The tiny InternVL, or with --llm-width a random one whose language model is wider (4 layers of
    llm_width, heads of 64): the same tokens, a larger share of the step that grows with the positions."""
    import torch
    from transformers import AutoConfig, InternVLForConditionalGeneration

    torch.manual_seed(0)
    if not llm_width:
        return InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    cfg = AutoConfig.from_pretrained(model_dir)
    text = cfg.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = llm_width, 4 * llm_width, 4
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = llm_width // 64, max(1, llm_width // 128), 64
    text.layer_types = ["full_attention"] * 4
    for c in (cfg, text, cfg.vision_config):
        c._attn_implementation = "sdpa"
    return InternVLForConditionalGeneration(cfg)


def batch_counts(batch: dict, samples: list) -> dict[str, int]:
    width = batch["input_ids"].numel()
    in_samples = sum(len(s.input_ids) for s in samples)
    useful = sum(int(s.attention_mask.sum()) for s in samples)
    supervised = sum(int((s.labels[1:] != -100).sum()) for s in samples)
    return {"positions": width, "pad": width - in_samples, "useful": useful, "supervised": supervised,
            "rows": batch["input_ids"].shape[0], "width": batch["input_ids"].shape[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8, help="samples per micro-batch (train.per_device_batch_size)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pack-max-tokens", type=int, default=512, help="train.pack_max_tokens (the demo's max_seq_length)")
    ap.add_argument("--pack-max-tiles", type=int, default=64, help="train.pack_max_tiles")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--llm-width", type=int, default=0, help="0: the tiny model; N: a random 4-layer language model N wide")
    args = ap.parse_args()

    import torch

    from vlm_core.data.collator import Collator, model_inputs
    from vlm_core.model.loss import vlm_loss

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="vlm_packing_bench_"))
    tok, model_dir, samples = demo_samples(work, args.samples, args.seed)
    chunks = [samples[i : i + args.batch] for i in range(0, len(samples) - args.batch + 1, args.batch)]
    variants = {
        "padded": Collator(tok.pad_token_id, 8),
        "packed": Collator(tok.pad_token_id, 8, args.pack_max_tokens, args.pack_max_tiles),
    }
    data = {name: [(col(c), batch_counts(col(c), c)) for c in chunks] for name, col in variants.items()}

    models, opts = {}, {}
    for name in variants:
        m = make_model(model_dir, args.llm_width)
        for p in m.model.vision_tower.parameters():
            p.requires_grad_(False)
        m.train()
        models[name] = m
        opts[name] = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

    times: dict[str, list[float]] = {name: [] for name in variants}
    steps = min(args.steps + 2, len(chunks))
    for k in range(steps):
        for name in variants:  # take turns, so load on a shared machine hits every variant alike
            batch, _ = data[name][k]
            t = time.perf_counter()
            out = models[name](**{key: v for key, v in model_inputs(batch).items() if key != "labels"})
            loss = vlm_loss(out.logits, batch["labels"], "square", sample_index=batch.get("sample_index"))
            loss.backward()
            opts[name].step()
            opts[name].zero_grad()
            if k >= 2:
                times[name].append(time.perf_counter() - t)

    rows = {}
    for name in variants:
        counts = [c for _, c in data[name]]
        timed = counts[2:steps]
        step_s, best_s = statistics.median(times[name]), min(times[name])
        per_step = {key: sum(c[key] for c in timed) / len(timed) for key in ("useful", "supervised")}
        rows[name] = {
            "padding": sum(c["pad"] for c in counts) / sum(c["positions"] for c in counts),
            "rows": sum(c["rows"] for c in counts) / len(counts),
            "width": sum(c["width"] for c in counts) / len(counts),
            "step_s": step_s,
            "best_step_s": best_s,
            "useful_per_s": per_step["useful"] / step_s,
            "useful_per_s_best": per_step["useful"] / best_s,
            "supervised_per_s": per_step["supervised"] / step_s,
        }
    base = rows["padded"]
    model = "the tiny InternVL" if not args.llm_width else f"the tiny InternVL with a {args.llm_width}-wide, 4-layer language model"
    lines = [
        f"### {model}",
        "",
        f"`python benchmarks/packing_bench.py --samples {args.samples} --batch {args.batch} --steps {args.steps} "
        f"--pack-max-tokens {args.pack_max_tokens} --pack-max-tiles {args.pack_max_tiles} --threads {args.threads} "
        f"--llm-width {args.llm_width}`: {len(samples)} samples, micro-batches of {args.batch}.",
        "",
        "| collation | rows x width (mean) | padding | step, ms (fastest) | useful tokens/s (fastest) | vs padded "
        "| supervised tokens/s | vs padded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['rows']:.1f} x {r['width']:.0f} | {r['padding']:.1%} | {r['step_s'] * 1000:.0f} "
                     f"({r['best_step_s'] * 1000:.0f}) | {r['useful_per_s']:,.0f} ({r['useful_per_s_best']:,.0f}) | "
                     f"{r['useful_per_s'] / base['useful_per_s']:.2f}x ({r['useful_per_s_best'] / base['useful_per_s_best']:.2f}x) | "
                     f"{r['supervised_per_s']:,.1f} | {r['supervised_per_s'] / base['supervised_per_s']:.2f}x |")
    print("\n".join(lines))
    print(json.dumps(rows, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
