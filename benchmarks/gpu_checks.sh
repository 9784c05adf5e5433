#!/usr/bin/env bash
# One GPU session's worth of checks on a single H100/H200, in one command (≈ 9 minutes):
#   1. every GPU test (kernels vs reference, the model on the Triton kernels, KV-cache decode, no host syncs);
#   2. benchmarks/host_sync.py (one DSA layer fwd+bwd at 32K: GPU time, wall time, syncs seen);
#   3. benchmarks/train_stages.py (small model fwd+bwd per stage: dense, warm-up, sparse vs plain SDPA, tokens/s);
#      benchmarks/decode.py (batched decode tokens/s, sparse vs dense attention over a KV cache);
#   4. the small model's sparse stage for a few steps (tokens/s) and a GRPO smoke run on the GPU.
# Usage: OUT=/some/dir bash benchmarks/gpu_checks.sh   (results and logs under $OUT)
# The GPU image has torch/Triton but not megatron-core or OmegaConf: wheels in .whl/ are installed first when present.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import tensorboard" 2>/dev/null && TB=true || TB=false
python3 -c "import rich" 2>/dev/null && PROGRESS=rich || PROGRESS=none

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "=== $name exit $? after ${SECONDS}s total"
  tail -n 15 "$OUT/$name.log"
}

step gpu_tests 170 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/ops tests/model
# Decode runs in its own process: a device-side assert breaks the CUDA context for everything after it.
# (For a device-side assert, rerun this step with DSA_DEBUG=1 CUDA_LAUNCH_BLOCKING=1: readable errors, but the
# debug checks synchronise, so the no-host-sync and CUDA-graph tests skip themselves then.)
step gpu_rl_tests 110 python3 -m pytest -q -p no:cacheprovider -m gpu tests/rl
step train_stages 120 python3 benchmarks/train_stages.py --out "$OUT"
step decode 110 python3 benchmarks/decode.py --out "$OUT" --budget-s 75
step train_sparse 90 python3 -m dsa_dist.train.cli configs/single_gpu.yaml pipeline=[sparse] \
  stages.sparse.steps=20 stages.sparse.warmup_steps=2 logging.log_interval=5 data.eval_tasks=[] \
  checkpoint.interval=0 run_dir=/tmp/run_sparse logging.tensorboard=$TB logging.progress=$PROGRESS
echo "done after ${SECONDS}s"
