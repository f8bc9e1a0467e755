"""GPU check: tokens/s, MFU and peak memory of InternVL3-1B-shaped training steps, packed vs unpacked.

    python benchmarks/gpu_check.py                       # one GPU, ~3-6 min on an H200
    python benchmarks/gpu_check.py --tiny --device cpu   # smoke mode: tiny shapes on CPU, seconds

Why this script stands alone: the GPU machines we are lent have torch and transformers but none of
DeepSpeed, WebDataset, Prefect or pydantic, and no network. So it imports nothing from vlm_core
(whose config needs pydantic) and no checkpoint: it builds a random `InternVLForConditionalGeneration`
with the published InternVL3-1B-hf shapes (the same way vlm_core/model/tiny.py builds the tiny one),
generates token ids and pixel values for a demo-like mix of samples, and packs them itself.

What it measures, per attention kernel (sdpa, and flash_attention_2 when importable) and layout:

* unpacked: `--batch-size` samples per step, right-padded to the longest, with an attention mask;
* packed: greedy first-fit packs of the same samples under a token budget (`--pack-max-tokens`) and a
  tile budget (`--pack-max-tiles`), one pack per step, position ids restarting at 0 for each sample
  and NO attention mask. transformers then finds the sample boundaries from the position ids:
  `masking_utils.find_packed_sequence_indices` (sdpa / eager: a block-causal mask) and
  `modeling_flash_attention_utils._is_packed_sequence` (flash_attention_2: varlen kernels, batch 1).
  The loss needs no boundary handling: every sample starts with unsupervised prompt tokens, so the
  label shift never makes one sample predict the next one's first token.

Training set-up, as vlm_core trains by default: weights in bf16, vision encoder frozen (its forward
runs without gradients), projector and language model trained, fused torch AdamW, no gradient
checkpointing. Every variant starts from the same seeded weights.

Reported: tokens/s (non-padding language-model tokens, image tokens included), MFU and the peak
memory allocated. MFU = useful model FLOPs per second / peak (H200 bf16 dense: 989 TFLOP/s), with
padding counted as waste and the useful FLOPs of a step being

    6 * P_train * T                       trained matmuls (projector + language model incl. lm_head,
                                          not the embedding lookup), forward + backward, T tokens
  + 2 * P_vision * 1025 * tiles           frozen vision encoder, forward only (1024 patches + CLS)
  + 6 * L_lm * d_lm * sum(s_i ** 2)       causal attention scores and values, forward + backward,
                                          s_i the length of each sample (not of its pack)
  + 4 * L_vit * d_vit * 1025 ** 2 * tiles full attention in each tile, forward only
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from dataclasses import dataclass

import torch

H200_BF16_PEAK = 989e12  # dense bf16 TFLOP/s, no sparsity
TOKENS_PER_TILE = 256  # (448 / 14) ** 2 * 0.5 ** 2 after the pixel shuffle
IMG_START, IMG_END, IMG_CONTEXT = 151665, 151666, 151667  # InternVL3's <img>, </img>, <IMG_CONTEXT> ids


def model_config(tiny: bool):
    """The InternVL3-1B-hf shapes (InternViT-300M + Qwen2.5-0.5B), or vlm_core's tiny ones."""
    from transformers import InternVLConfig

    if tiny:
        vision = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      image_size=112, patch_size=14)
        text = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
        image_seq_length, ids = 16, (509, 510, 511)
    else:
        vision = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                      image_size=448, patch_size=14, layer_scale_init_value=0.1)
        text = dict(vocab_size=151674, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                    num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0)
        image_seq_length, ids = TOKENS_PER_TILE, (IMG_START, IMG_END, IMG_CONTEXT)
    config = InternVLConfig(
        vision_config=dict(model_type="internvl_vision", use_qk_norm=False, norm_type="layer_norm",
                           use_mean_pooling=False, **vision),
        text_config=dict(model_type="qwen2", max_position_embeddings=32768, tie_word_embeddings=False,
                         use_cache=False, **text),
        image_token_id=ids[2], image_seq_length=image_seq_length, downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    return config, ids


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    tiles: int


def demo_mix(n: int, config, ids: tuple[int, int, int], seed: int) -> list[Sample]:
    """Demo-like samples: 1/6 text only, 2/3 one image of 1-6 tiles (+ a thumbnail tile when more than
    one, as InternVL's dynamic tiling does), 1/6 two images of 1-2 tiles (+ thumbnail) each.
    Prompts of 20-60 tokens (unsupervised), answers of 5-150 tokens (supervised)."""
    rnd = random.Random(seed)
    img_start, img_end, img_context = ids
    per_tile = config.image_seq_length
    text_vocab = min(ids) - 1  # ordinary tokens only
    out = []
    for _ in range(n):
        kind = rnd.random()
        images = [] if kind < 1 / 6 else [rnd.randint(1, 6)] if kind < 5 / 6 else [rnd.randint(1, 2), rnd.randint(1, 2)]
        images = [t + 1 if t > 1 else t for t in images]  # the thumbnail
        prompt = [rnd.randrange(text_vocab) for _ in range(rnd.randint(20, 60))]
        for tiles in images:
            prompt += [img_start] + [img_context] * (tiles * per_tile) + [img_end]
        answer = [rnd.randrange(text_vocab) for _ in range(rnd.randint(5, 150))]
        out.append(Sample(prompt + answer, [-100] * len(prompt) + answer, sum(images)))
    return out


def pack(samples: list[Sample], max_tokens: int, max_tiles: int) -> list[list[Sample]]:
    """Greedy first-fit: each sample goes into the first pack with room for its tokens and its tiles."""
    packs: list[list[Sample]] = []
    room: list[tuple[int, int]] = []  # (tokens, tiles) left in each pack
    for s in samples:
        if len(s.input_ids) > max_tokens or s.tiles > max_tiles:
            raise SystemExit(f"a sample of {len(s.input_ids)} tokens / {s.tiles} tiles exceeds --pack-max-tokens "
                             f"{max_tokens} / --pack-max-tiles {max_tiles}; raise them")
        for i, (tokens, tiles) in enumerate(room):
            if len(s.input_ids) <= tokens and s.tiles <= tiles:
                packs[i].append(s)
                room[i] = (tokens - len(s.input_ids), tiles - s.tiles)
                break
        else:
            packs.append([s])
            room.append((max_tokens - len(s.input_ids), max_tiles - s.tiles))
    return packs


def packed_batch(group: list[Sample]) -> dict:
    """One row: the samples end to end, position ids restarting per sample, no attention mask."""
    ids = [t for s in group for t in s.input_ids]
    return {"input_ids": torch.tensor([ids]),
            "labels": torch.tensor([[t for s in group for t in s.labels]]),
            "position_ids": torch.tensor([[p for s in group for p in range(len(s.input_ids))]])}


def padded_batch(group: list[Sample], pad_id: int = 0) -> dict:
    """Samples right-padded to the longest (a multiple of 8), with an attention mask."""
    width = -(-max(len(s.input_ids) for s in group) // 8) * 8
    rows = [(s.input_ids, s.labels, width - len(s.input_ids)) for s in group]
    return {"input_ids": torch.tensor([i + [pad_id] * p for i, _, p in rows]),
            "labels": torch.tensor([lab + [-100] * p for _, lab, p in rows]),
            "attention_mask": torch.tensor([[1] * len(i) + [0] * p for i, _, p in rows])}


def side(size: int | list[int] | tuple[int, ...]) -> int:
    """The vision config keeps sizes as [height, width]; tiles are square."""
    return size if isinstance(size, int) else size[0]


def step_flops(group: list[Sample], config, p_train: int, p_vision: int) -> float:
    """Useful FLOPs of one training step on these samples (the formula in the module docstring)."""
    v, t = config.vision_config, config.text_config
    patches = (side(v.image_size) // side(v.patch_size)) ** 2 + 1
    tiles = sum(s.tiles for s in group)
    tokens = sum(len(s.input_ids) for s in group)
    return (6 * p_train * tokens + 2 * p_vision * patches * tiles
            + 6 * t.num_hidden_layers * t.hidden_size * sum(len(s.input_ids) ** 2 for s in group)
            + 4 * v.num_hidden_layers * v.hidden_size * patches**2 * tiles)


def build_model(config, attn: str, device: str, seed: int, train_vision: bool):
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = InternVLForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=torch.bfloat16)
    model.to(device).train()  # a no-op where the device context already placed the weights
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(train_vision)
    return model


def param_counts(model) -> tuple[int, int, int]:
    """(all, trained matmul weights: projector + LM + lm_head without the embedding, vision encoder)."""
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    embed = model.get_input_embeddings().weight.numel()
    return total, total - vision - embed, vision


def run_variant(config, attn: str, layout: str, samples: list[Sample], args) -> dict:
    device = torch.device(args.device)
    model = build_model(config, attn, args.device, args.seed, args.train_vision)
    total, p_train, p_vision = param_counts(model)
    if args.train_vision:
        p_train += p_vision
    fused = device.type == "cuda" or None  # the CPU fused kernel needs torch >= 2.4; the default is fine for a smoke
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=fused)
    size = side(config.vision_config.image_size)
    if layout == "packed":
        groups = pack(samples, args.pack_max_tokens, args.pack_max_tiles)
        batches = [packed_batch(g) for g in groups]
    else:
        groups = [samples[i:i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
        batches = [padded_batch(g) for g in groups]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tokens = flops = seconds = slots = 0.0
    losses = []
    for i, (group, batch) in enumerate(zip(groups, batches, strict=True)):
        batch = {k: v.to(device) for k, v in batch.items()}
        tiles = sum(s.tiles for s in group)  # random pixels, made on the device (no host copy to time)
        if tiles:
            batch["pixel_values"] = torch.randn(tiles, 3, size, size, device=device, dtype=torch.bfloat16)
        sync(device)
        t0 = time.perf_counter()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:  # the first steps pay kernel selection and allocator growth
            seconds += time.perf_counter() - t0
            tokens += sum(len(s.input_ids) for s in group)
            slots += batch["input_ids"].numel()
            flops += step_flops(group, config, p_train, p_vision)
            losses.append(loss.item())
    if not losses:
        raise SystemExit(f"{layout}: only {len(batches)} steps, all warm-up; raise --samples or lower --warmup")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del model, opt
    return {"attn": attn, "layout": layout, "steps": len(losses), "tokens_per_s": tokens / seconds,
            "mfu": flops / seconds / args.peak_flops, "tflops": flops / seconds / 1e12, "peak_gib": peak,
            "padding": 1 - tokens / slots, "seconds": seconds, "loss": sum(losses) / len(losses),
            "params_b": total / 1e9}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def attention_kernels(requested: str | None, device: str) -> list[str]:
    if requested:
        return requested.split(",")
    from transformers.utils import is_flash_attn_2_available

    return ["sdpa", "flash_attention_2"] if device.startswith("cuda") and is_flash_attn_2_available() else ["sdpa"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (vlm_core's tiny model) for a CPU smoke run")
    ap.add_argument("--samples", type=int, default=None, help="samples per variant (default 384, tiny 24)")
    ap.add_argument("--batch-size", type=int, default=8, help="unpacked: samples per step")
    ap.add_argument("--pack-max-tokens", type=int, default=None, help="packed: tokens per pack (default 16384, tiny 1024)")
    ap.add_argument("--pack-max-tiles", type=int, default=None, help="packed: tiles per pack (default 64, tiny 64)")
    ap.add_argument("--warmup", type=int, default=2, help="steps not timed at the start of each variant")
    ap.add_argument("--attn", default=None, help="comma-separated kernels (default: sdpa, + flash_attention_2 if importable)")
    ap.add_argument("--train-vision", action="store_true", help="train the vision encoder too (default: frozen)")
    ap.add_argument("--peak-flops", type=float, default=H200_BF16_PEAK, help="accelerator peak for MFU (FLOP/s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or use --tiny --device cpu for the smoke mode")
    args.samples = args.samples or (24 if args.tiny else 384)
    args.pack_max_tokens = args.pack_max_tokens or (1024 if args.tiny else 16384)
    args.pack_max_tiles = args.pack_max_tiles or 64
    config, ids = model_config(args.tiny)
    samples = demo_mix(args.samples, config, ids, args.seed)
    import transformers

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {name}; torch {torch.__version__}; transformers {transformers.__version__}; "
          f"{'tiny' if args.tiny else 'InternVL3-1B'} shapes; {len(samples)} samples, "
          f"{sum(len(s.input_ids) for s in samples)} tokens, {sum(s.tiles for s in samples)} tiles", flush=True)
    rows = []
    for attn in attention_kernels(args.attn, args.device):
        for layout in ("unpacked", "packed"):
            rows.append(run_variant(config, attn, layout, samples, args))
            r = rows[-1]
            print(f"  done {attn} {layout}: {r['steps']} timed steps in {r['seconds']:.1f} s", flush=True)
    print(f"\nparameters {rows[0]['params_b']:.3f} B; MFU vs {args.peak_flops / 1e12:.0f} TFLOP/s (formula: "
          "benchmarks/gpu_check.py docstring)\n")
    print("| attention | layout | timed steps | tokens/s | model TFLOP/s | MFU | padding | peak mem (GiB) | mean loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['attn']} | {r['layout']} | {r['steps']} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | "
              f"{r['mfu']:.1%} | {r['padding']:.1%} | {r['peak_gib']:.1f} | {r['loss']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
