#!/usr/bin/env bash
# GPU check: InternVL3-1B-shaped training steps, packed vs unpacked, sdpa (+ flash_attention_2 when
# importable): tokens/s, MFU, peak memory. Needs only torch + transformers (no DeepSpeed, WebDataset,
# Prefect or pydantic, no network), so nothing has to be installed on the GPU machine.
#   bash benchmarks/gpu_check.sh                      # on one GPU; ~3-6 min on an H200, killed at 8 min
#   bash benchmarks/gpu_check.sh --tiny --device cpu  # smoke mode, anywhere
# Extra arguments go to benchmarks/gpu_check.py (--help lists them). The table is also written to
# ${OUT:-.}/gpu_check.md and the rows to ${OUT:-.}/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-.}
mkdir -p "$OUT_DIR"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__)"
timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" benchmarks/gpu_check.py --json "$OUT_DIR/gpu_check.json" "$@" \
  | tee "$OUT_DIR/gpu_check.md"
