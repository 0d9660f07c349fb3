#!/usr/bin/env bash
# One-shot GPU check (issue 10): on a machine with one CUDA GPU, from the repository root,
#   benchmarks/gpu_check.sh [OUT_DIR]
# runs, within ~8 minutes:
#   1. the GPU tests: the CUDA-graph capture of a *_dec eval forward (tests/test_compile.py), then
#   2. `timm-dec bench gpu`: the Triton warp against the PyTorch reference on CUDA (forward, grad x, grad knots,
#      grad logits), `bench warp --device cuda`, and `bench overhead --device cuda` for ViT-S, Swin-T and BEiT-B in
#      eager, compiled and CUDA-graph modes, all in OUT_DIR/bench_gpu.json (sections past the budget are recorded as
#      "not measured", never filled in).
# Without a GPU: `timm-dec bench gpu --device cpu --dry-run` runs the same code paths on tiny inputs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check}"
PY="${PY:-.venv/bin/python}"
mkdir -p "$OUT"
cat /proc/loadavg > "$OUT/loadavg_before.txt" 2>/dev/null || true
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1 || true
timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_compile.py -k cuda_graph 2>&1 | tee "$OUT/pytest_cuda.txt" | tail -3
timeout 450 "$PY" -m timm_dec.cli bench gpu --device cuda --out "$OUT" --budget-s 400 2>&1 | tee "$OUT/bench_gpu.txt"
status=${PIPESTATUS[0]}
cat /proc/loadavg > "$OUT/loadavg_after.txt" 2>/dev/null || true
exit "$status"
