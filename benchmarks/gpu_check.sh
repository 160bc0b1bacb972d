#!/usr/bin/env bash
# GPU check: CUDA equivalence tests + the benchmark grid of docs/benchmarks.md, in one go
# (< 8 minutes on one H100/H200). Results (logs and one JSON line per run) go to $1 or $OUT.
#   bash benchmarks/gpu_check.sh results/
#   QUICK=1 bash benchmarks/gpu_check.sh results/   # tests + the rows comparable with the
#                                                   # official figures (< 5 minutes)
# Needs python3 with torch, torchvision, timm, lightning, torchmetrics, pytest; the package is
# used from src/ (no install needed).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_results}}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

echo "== CUDA equivalence tests"
timeout 240 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/tests.txt" | tail -5

bench() {  # name, then densemtl bench options
  local name=$1; shift
  echo "== $name"
  timeout "${BENCH_TIMEOUT:-150}" $py -m densemtl bench --json "$@" > "$out/$name.log" 2>&1
  tail -n 1 "$out/$name.log" | tee -a "$out/bench.jsonl" | cut -c1-400
}
sdn=(--tasks semseg,depth,normals --backbone resnet101 --classes 16 --device cuda)
if [ -n "${QUICK:-}" ]; then
  BENCH_TIMEOUT=45
  bench ref_fp32_512        "${sdn[@]}" --height 512 --width 1024 --batch 2 --reference --iters 6
  bench fast_fp32_512       "${sdn[@]}" --height 512 --width 1024 --batch 2 --iters 8
  bench fast_tf32_512       "${sdn[@]}" --height 512 --width 1024 --batch 2 --precision tf32 --iters 8
  bench ref_bf16_512        "${sdn[@]}" --height 512 --width 1024 --batch 2 --precision bf16 --reference --iters 6
  bench fast_bf16_512       "${sdn[@]}" --height 512 --width 1024 --batch 2 --precision bf16 --iters 8
  bench loop_bf16_512       "${sdn[@]}" --height 512 --width 1024 --batch 2 --precision bf16 --no-batched-pairs --iters 8
  bench infer_fp32_512_b1   "${sdn[@]}" --height 512 --width 1024 --batch 1 --mode infer --iters 15
  echo "results in $out"
  exit 0
fi
bench ref_fp32_512       "${sdn[@]}" --height 512 --width 1024 --batch 2 --reference --iters 8
bench fast_fp32_512      "${sdn[@]}" --height 512 --width 1024 --batch 2 --iters 10
bench fast_tf32_512      "${sdn[@]}" --height 512 --width 1024 --batch 2 --precision tf32 --iters 10
bench fast_bf16_512      "${sdn[@]}" --height 512 --width 1024 --batch 2 --precision bf16 --iters 10
bench fast_bf16_cl_512   "${sdn[@]}" --height 512 --width 1024 --batch 2 --precision bf16 --channels-last --iters 10
bench ref_bf16_512       "${sdn[@]}" --height 512 --width 1024 --batch 2 --precision bf16 --reference --iters 8
bench ckpt_bf16_512      "${sdn[@]}" --height 512 --width 1024 --batch 2 --precision bf16 --checkpoint-exchange --iters 10
bench fast_bf16_1024     "${sdn[@]}" --height 1024 --width 2048 --batch 2 --precision bf16 --iters 5 --warmup 2
bench infer_fp32_512_b1  "${sdn[@]}" --height 512 --width 1024 --batch 1 --mode infer --iters 20
bench infer_bf16_512_b1  "${sdn[@]}" --height 512 --width 1024 --batch 1 --mode infer --precision bf16 --channels-last --iters 20
bench train_b1_1024      "${sdn[@]}" --height 1024 --width 2048 --batch 1 --precision bf16 --iters 5 --warmup 2
echo "results in $out"
