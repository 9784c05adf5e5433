#!/usr/bin/env bash
# The kernel round's GPU check on one H100/H200 (≤ 9.5 minutes): the GPU tests of the kernels changed in this round,
# then the benchmarks that time each new kernel against the one it may replace, in the same process:
#   1. indexer-KL backward v2 vs legacy, the filtered top-k vs the workspace top-k, the sparse-attention kernels;
#   2. benchmarks/indexer_kl.py --compare-legacy (KL backward and the fused KL's overhead at 128K);
#   3. benchmarks/indexer_topk.py (both selection paths, 32K and 128K, both shapes);
#   4. benchmarks/sparse_backward.py at V3.2 128K (two launches vs the mixed launch).
# Usage: OUT=/some/dir bash benchmarks/gpu_checks_kernels.sh   (results and logs under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks_kernels}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s, at ${SECONDS}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "=== $name exit $? after ${SECONDS}s total"
  grep -v -i "warn" "$OUT/$name.log" | tail -n 28
}

step kernel_tests 200 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/kernels/test_indexer_kl_backward_kernel.py \
  tests/kernels/test_indexer_kl_kernel.py tests/kernels/test_sparse_attention_kl_kernel.py \
  tests/kernels/test_topk_filter.py tests/kernels/test_indexer_kernels.py
step indexer_kl 120 python3 benchmarks/indexer_kl.py --kinds from_target fused --lengths 131072 --compare-legacy \
  --out "$OUT"
step indexer_topk 170 python3 benchmarks/indexer_topk.py --no-sweep --lengths 32768 131072 --out "$OUT"
step sparse_backward 60 python3 benchmarks/sparse_backward.py --shapes V3.2 --lengths 131072 --rep-ms 500 --out "$OUT"
echo "done after ${SECONDS}s"
