"""benchmarks/gpu_check.py: its packing is what transformers reads as packed, and its smoke mode runs end to end.

The GPU check runs on machines without vlm_core's dependencies, so it packs samples itself; these
tests pin that its packs stay within budget and that transformers derives one block per sample from
the position ids alone (no attention mask), which is what makes a pack train like separate samples.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_packs_respect_both_budgets_and_transformers_sees_one_block_per_sample():
    from transformers.masking_utils import find_packed_sequence_indices

    g = _gpu_check()
    config, ids = g.model_config(tiny=True)
    samples = g.demo_mix(40, config, ids, seed=1)
    packs = g.pack(samples, max_tokens=400, max_tiles=9)
    assert sorted(id(s) for p in packs for s in p) == sorted(id(s) for s in samples)  # each sample exactly once
    assert all(sum(len(s.input_ids) for s in p) <= 400 and sum(s.tiles for s in p) <= 9 for p in packs)
    assert len(packs) < len(samples)  # first-fit did put several samples together
    group = max(packs, key=len)
    batch = g.packed_batch(group)
    assert "attention_mask" not in batch
    blocks = find_packed_sequence_indices(batch["position_ids"])[0].tolist()
    expected = [i for i, s in enumerate(group) for _ in s.input_ids]
    assert blocks == expected
    # every sample starts unsupervised, so the shifted labels never cross from one sample into the next
    starts = torch.tensor([sum(len(s.input_ids) for s in group[:i]) for i in range(len(group))])
    assert (batch["labels"][0, starts] == -100).all()


@pytest.mark.integration
def test_smoke_mode_runs_end_to_end_and_prints_the_table(tmp_path):
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu",
                          "--samples", "8", "--batch-size", "4", "--warmup", "0", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    table = [x for x in res.stdout.splitlines() if x.startswith("| sdpa |")]
    assert [x.split("|")[2].strip() for x in table] == ["unpacked", "packed"]
    rows = {r["layout"]: r for r in json.loads(out.read_text())}
    assert rows["packed"]["padding"] == 0 and rows["unpacked"]["padding"] > 0
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["loss"] > 0 for r in rows.values())
