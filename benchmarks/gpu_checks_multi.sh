#!/usr/bin/env bash
# One command on a 4-GPU host (≈ 9 minutes): the NCCL context-parallel tests, the small model's CP=4-vs-DP=4
# rows of the scaling benchmark, and the same training job launched through Ray and through torchrun.
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

step nccl_tests 180 python3 -m pytest -q -p no:cacheprovider tests/multigpu
step cp_scaling 80 python3 -m torch.distributed.run --nproc-per-node "$GPUS" --master-addr 127.0.0.1 \
  --master-port 29611 benchmarks/cp_scaling.py --out "$OUT" --only-compare --budget-s 55 --tag after_sync
step ray_vs_torchrun 240 python3 benchmarks/ray_vs_torchrun.py --out "$OUT" --steps 12 --cp 2 4 --timeout 100
echo "done after ${SECONDS}s"
