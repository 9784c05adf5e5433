#!/usr/bin/env bash
# One command on a 4-GPU host (≈ 9 minutes): the NCCL context-parallel tests, then the long-context rows of the
# scaling benchmark (tag "long"): the small model at 512K tokens on 4 GPUs with full activation recompute, the
# V3.2 DSA layer at 512K on 4 GPUs, the model at 128K on 1 and 2 GPUs and 256K on 4, and the dense model at 128K
# on 4 GPUs (the dense case is started only if the budget allows; it uses the fused dense attention when present).
# Usage: OUT=/some/dir bash benchmarks/gpu_checks_multi.sh   (wheels from .whl/ installed first when present)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks_multi}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
GPUS=$(nvidia-smi -L | wc -l)

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "=== $name exit $? after ${SECONDS}s total"
  tail -n 25 "$OUT/$name.log"
}

step nccl_tests 150 python3 -m pytest -q -p no:cacheprovider tests/multigpu
# Long cases, most wanted first (the budget cuts the tail): the 512K targets, CP=1/2 at 128K, the dense comparison,
# 256K and 1M.
step cp_scaling 420 python3 -m torch.distributed.run --nproc-per-node "$GPUS" --master-addr 127.0.0.1 \
  --master-port 29611 benchmarks/cp_scaling.py --out "$OUT" --tag long --budget-s 330 --recompute full --reps 2 \
  --cases model:524288:4,layer:524288:4,model:131072:1,model:131072:2,dense_model:131072:4,model:262144:4,model:1048576:4,dense_layer:131072:4 \
  --guess-dense-tflops 150
echo "done after ${SECONDS}s"
