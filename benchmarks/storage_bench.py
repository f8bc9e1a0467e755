"""Checkpoint sync vs plain boto3, and LoRA merge vs a plain load + save, side by side.

    .venv/bin/python benchmarks/storage_bench.py [--mb 240] [--repeats 3] [--skip-storage] [--skip-merge] [--json out.json]

Storage: a checkpoint-like folder (model.safetensors, two ZeRO optimizer shards, model states, a
tokenizer and a few small json/pt files; random bytes, --mb in all) is uploaded and downloaded with
`vlm_core.storage.upload_folder` / `download_folder` (which also hash every file, write the manifest
last and verify each download) and with boto3's `upload_file` / `download_file` (its TransferManager:
8 MiB multipart chunks, 10 threads per file), one file after the other, to the same local
`moto_server` started (and stopped, by PID) by this script. Each repeat uses a fresh prefix; best of
--repeats per variant, variants interleaved.

Merge: a random InternVL bigger than the test model (~165 MB fp32) with a LoRA adapter on the
language model is built offline; `merge_lora` (load, merge, save, reload and verify) and a plain
`from_pretrained` + `save_pretrained` then each run in a fresh subprocess, timed after imports, with
peak RSS from `resource.getrusage(RUSAGE_SELF).ru_maxrss` (also reported above the RSS right after
the imports, i.e. what the work itself added).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import start_moto  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MB = 1 << 20


# ------------------------------------------------------------------------------------------ storage
def make_checkpoint(folder: Path, total_mb: int) -> int:
    """A checkpoint-like folder of `total_mb` MiB: a few large files and several small ones; returns bytes."""
    import numpy as np

    rng = np.random.default_rng(0)
    big = {"model.safetensors": 0.40, "global_step100/zero_pp_rank_0_mp_rank_00_optim_states.pt": 0.27,
           "global_step100/zero_pp_rank_1_mp_rank_00_optim_states.pt": 0.27,
           "global_step100/zero_pp_rank_0_mp_rank_00_model_states.pt": 0.03, "tokenizer.json": 0.02}
    small = {"config.json": 4096, "generation_config.json": 200, "trainer_state.json": 30_000, "latest": 13,
             "scheduler.pt": 1500, "rng_state_0.pth": 16_000, "rng_state_1.pth": 16_000, "training_args.bin": 6000,
             "tokenizer_config.json": 9000, "chat_template.jinja": 700, "preprocessor_config.json": 500,
             "checkpoint_complete.json": 40}
    sizes = {**{k: int(v * total_mb * MB) for k, v in big.items()}, **small}
    for rel, size in sizes.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    return sum(sizes.values())


def stop_moto(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, 15)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, 9)
            proc.wait()


def bench_storage(work: Path, total_mb: int, repeats: int) -> list[dict]:
    import boto3

    from vlm_core.storage import download_folder, upload_folder

    src = work / "checkpoint-100"
    nbytes = make_checkpoint(src, total_mb)
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="bench")

    def ours_up(prefix: str) -> None:
        upload_folder(src, f"s3://bench/{prefix}")

    def ours_down(prefix: str) -> None:
        download_folder(f"s3://bench/{prefix}", work / f"down-{prefix}")

    def boto_up(prefix: str) -> None:
        for rel in files:
            client.upload_file(str(src / rel), "bench", f"{prefix}/{rel}")

    def boto_down(prefix: str) -> None:
        for rel in files:
            dest = work / f"down-{prefix}" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file("bench", f"{prefix}/{rel}", str(dest))

    def timed(fn, prefix: str) -> float:
        start = time.perf_counter()
        fn(prefix)
        return time.perf_counter() - start

    def clean(prefix: str) -> None:
        objs = client.list_objects_v2(Bucket="bench", Prefix=f"{prefix}/").get("Contents", [])
        if objs:
            client.delete_objects(Bucket="bench", Delete={"Objects": [{"Key": o["Key"]} for o in objs]})
        shutil.rmtree(work / f"down-{prefix}", ignore_errors=True)

    best: dict[tuple[str, str], float] = {}
    for r in range(repeats):
        order = [("vlm_core.storage", ours_up, ours_down), ("boto3 TransferManager", boto_up, boto_down)]
        for name, up, down in order if r % 2 == 0 else order[::-1]:
            prefix = f"{name.split('.')[0].split()[0]}-{r}"
            t_up, t_down = timed(up, prefix), timed(down, prefix)
            for op, t in (("upload", t_up), ("download", t_down)):
                best[(op, name)] = min(t, best.get((op, name), float("inf")))
            clean(prefix)
    rows = []
    for op in ("upload", "download"):
        ref = best[(op, "boto3 TransferManager")]
        for name in ("vlm_core.storage", "boto3 TransferManager"):
            t = best[(op, name)]
            rows.append({"op": op, "client": name, "seconds": round(t, 2), "MiB_s": round(nbytes / MB / t, 1),
                         "ratio_vs_boto3": round(ref / t, 2), "files": len(files), "MiB": round(nbytes / MB, 1)})
    return rows


# ------------------------------------------------------------------------------------------- merge
def build_bigger_model(folder: Path) -> int:
    """A random InternVL of ~41M parameters (~165 MB fp32): tiny-model geometry, wider and deeper."""
    import torch
    from transformers import InternVLForConditionalGeneration

    from vlm_core.model.tiny import _save_processor_configs, build_tokenizer, tiny_config

    tok = build_tokenizer()
    cfg = tiny_config(tok)
    cfg.vision_config.update(dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024))
    cfg.text_config.update(dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6,
                                num_attention_heads=12, num_key_value_heads=4))
    cfg.text_config.layer_types = ["full_attention"] * cfg.text_config.num_hidden_layers  # derived at init
    cfg.dtype = "float32"
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    _save_processor_configs(folder, 6)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def build_adapter(base: str | Path, folder: str | Path, model_bytes: int) -> None:
    """A LoRA adapter (r=16) on the language model's projections, with non-zero B so it changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    peft_model.save_pretrained(folder)
    (Path(folder) / "model_bytes.txt").write_text(str(model_bytes))


def child(mode: str, base: str, adapter: str, out: str) -> None:
    """Runs in a fresh process: import everything, then time the work alone; print one JSON line."""
    import importlib.util

    import peft  # noqa: F401  (imported before timing in both modes: the comparison is of work, not imports)
    import torch
    from transformers import AutoTokenizer, InternVLForConditionalGeneration  # noqa: F401

    from vlm_core.config import DataConfig, ModelConfig
    from vlm_core.merge import merge_lora

    if importlib.util.find_spec("deepspeed"):  # save_pretrained's unwrap imports it lazily (~0.5 s), in both modes
        import deepspeed  # noqa: F401
    after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "build":
        build_adapter(base, adapter, build_bigger_model(Path(base)))
        return
    if mode == "merge":
        merge_lora(ModelConfig(path=base, dtype="float32"), adapter, out, data=DataConfig())
    else:
        InternVLForConditionalGeneration.from_pretrained(base, dtype=torch.float32).save_pretrained(out)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm = int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM")).split()[1])  # cross-check
    print("RESULT " + json.dumps({"seconds": seconds, "peak_kb": peak, "imports_kb": after_imports, "hwm_kb": hwm}))


def bench_merge(work: Path, repeats: int) -> list[dict]:
    base, adapter = work / "bigger-internvl", work / "adapter"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    # Built in a child too: Linux carries a parent's RSS into a spawned child's ru_maxrss, so this
    # process must stay smaller than a child's own import footprint (checked below).
    subprocess.run([sys.executable, __file__, "--child", "build", str(base), str(adapter), "-"], check=True,
                   capture_output=True, env=env, timeout=600)
    model_bytes = int((adapter / "model_bytes.txt").read_text())
    parent_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best: dict[str, dict] = {}
    for r in range(repeats):
        for mode in ("merge", "plain") if r % 2 == 0 else ("plain", "merge"):
            out = work / f"out-{mode}-{r}"
            res = subprocess.run([sys.executable, __file__, "--child", mode, str(base), str(adapter), str(out)],
                                 capture_output=True, text=True, env=env, timeout=600)
            line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
            if res.returncode != 0 or line is None:
                raise RuntimeError(f"{mode} child failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
            got = json.loads(line[7:])
            if got["imports_kb"] <= parent_kb:
                raise RuntimeError(f"the parent's peak RSS ({parent_kb} kB) would mask the child's; run with "
                                   "--skip-storage or fewer --mb")
            if mode not in best or got["seconds"] < best[mode]["seconds"]:
                best[mode] = got
            shutil.rmtree(out, ignore_errors=True)
    rows = []
    for mode, label in (("merge", "merge_lora (merge + save + reload + verify)"),
                        ("plain", "from_pretrained + save_pretrained")):
        b = best[mode]
        peak, added = b["peak_kb"] * 1024, (b["peak_kb"] - b["imports_kb"]) * 1024
        rows.append({"variant": label, "seconds": round(b["seconds"], 2), "vm_hwm_MB": round(b["hwm_kb"] / 1024),
                     "time_ratio": round(b["seconds"] / best["plain"]["seconds"], 2),
                     "peak_rss_MB": round(peak / MB), "peak_rss_x_model": round(peak / model_bytes, 2),
                     "rss_added_MB": round(added / MB), "rss_added_x_model": round(added / model_bytes, 2),
                     "model_MB": round(model_bytes / MB, 1)})
    return rows


# -------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=240, help="size of the checkpoint-like folder in MiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-storage", action="store_true")
    ap.add_argument("--skip-merge", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=4, metavar=("MODE", "BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="storage-bench-") as tmp:
        work = Path(tmp)
        # Merge first: its children must start from a small parent (see bench_merge).
        if not args.skip_merge:
            results["merge"] = bench_merge(work, args.repeats)
        if not args.skip_storage:
            moto, _ = start_moto()
            try:
                results["storage"] = bench_storage(work, args.mb, args.repeats)
            finally:
                stop_moto(moto)
            print("| operation | client | seconds | MiB/s | ÷ boto3 |\n|---|---|---|---|---|")
            for r in results["storage"]:
                print(f"| {r['op']} | {r['client']} | {r['seconds']} | {r['MiB_s']} | {r['ratio_vs_boto3']}× |")
        if "merge" in results:
            print("\n| variant | seconds | ÷ plain | peak RSS MB | ÷ model | added by the work MB | ÷ model |\n"
                  "|---|---|---|---|---|---|---|")
            for r in results["merge"]:
                print(f"| {r['variant']} | {r['seconds']} | {r['time_ratio']}× | {r['peak_rss_MB']} | "
                      f"{r['peak_rss_x_model']}× | {r['rss_added_MB']} | {r['rss_added_x_model']}× |")
            print(f"(model: {results['merge'][0]['model_MB']} MB fp32)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
