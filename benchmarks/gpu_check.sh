#!/usr/bin/env bash
# GPU check for LabelPooling, on one CUDA device, in under six minutes:
#   1. the pooling tests (tests/test_pooling*.py, including test_pooling_bins.py): the CUDA cases compare every
#      backend (auto / torch / triton) with the dense oracle on large batches, at 1x1 and at 7x7, 14x14 and 3x5
#      bins (Token Labeling); the Triton tests (slow ones included) run the compiled kernels instead of the
#      interpreter;
#   2. benchmarks/bench_pooling.py --device cuda (official path as shipped, PyTorch path on the GPU, Triton kernel;
#      B = 256, 1024, 4096);
#   3. benchmarks/bench_pooling.py --device cuda --output-size 14 (the TokenLabeling route against the PyTorch
#      path and the Triton bins kernel; B = 256, 1024).
# Everything lands in $OUT if set (else benchmarks/results/gpu_check/): env.txt, nvidia-smi.txt, tests.log,
# tests.xml (JUnit), bench_pooling_cuda.{log,json}, bench_pooling_cuda_tokens14.{log,json}. Every step always
# runs; the exit status is non-zero if any failed or timed out.
#
# Usage (from anywhere):  [PYTHON=python] [OUT=/some/dir] benchmarks/gpu_check.sh
# Needs: a Python with torch (CUDA build), torchvision, triton, click and pytest; the package is used from this
# checkout (PYTHONPATH), no install needed.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
py="${PYTHON:-}"
if [ -z "$py" ]; then  # the CI's venv if there is one, else python3
  if [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"; else py=python3; fi
fi
out="${OUT:-$repo/benchmarks/results/gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # the real kernel, not the interpreter
export PYTHONUNBUFFERED=1
status=0
start=$(date +%s)

{
  date -u
  git -C "$repo" log -1 --oneline 2>/dev/null || true
  "$py" -c 'import sys, torch, torchvision; print(sys.version.split()[0], "torch", torch.__version__, "torchvision",
torchvision.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")'
  "$py" -c 'import triton; print("triton", triton.__version__)' || echo "triton: not importable"
} >"$out/env.txt" 2>&1
cat "$out/env.txt"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true

if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device visible to $py; nothing to check" | tee -a "$out/env.txt"
  exit 2
fi

echo "== 1/3 tests (limit 200 s)"
timeout 200 "$py" -m pytest -q -p no:cacheprovider -rs --junitxml="$out/tests.xml" \
  tests/test_pooling.py tests/test_pooling_bins.py tests/test_pooling_triton.py 2>&1 | tee "$out/tests.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || { echo "gpu_check: tests failed or timed out (exit $rc)"; status=1; }
grep -q "needs a CUDA device" "$out/tests.log" && { echo "gpu_check: CUDA tests were skipped"; status=1; }

echo "== 2/3 bench_pooling --device cuda (limit $((290 - ($(date +%s) - start))) s)"
timeout $((290 - ($(date +%s) - start))) "$py" benchmarks/bench_pooling.py --device cuda --sweep-warps \
  --out "$out/bench_pooling_cuda.json" 2>&1 | tee "$out/bench_pooling_cuda.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || { echo "gpu_check: benchmark failed or timed out (exit $rc)"; status=1; }

echo "== 3/3 bench_pooling --device cuda --output-size 14 (limit $((350 - ($(date +%s) - start))) s)"
timeout $((350 - ($(date +%s) - start))) "$py" benchmarks/bench_pooling.py --device cuda --output-size 14 \
  --out "$out/bench_pooling_cuda_tokens14.json" 2>&1 | tee "$out/bench_pooling_cuda_tokens14.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || { echo "gpu_check: token benchmark failed or timed out (exit $rc)"; status=1; }

echo "gpu_check: done in $(($(date +%s) - start)) s, status $status, results in $out"
exit $status
