#!/usr/bin/env bash
# The CP overlap, before and after, on one multi-GPU host in one command (≤ 9 minutes wall, TOTAL_S):
#   1. tests/multigpu (the NCCL correctness tests: CP=2/4 against CP=1 in every top-k mode; TP2×CP2 on 4 GPUs);
#   2. benchmarks/cp_scaling.py --overlap on this tree (tag "overlap_after"): the small model's training step and
#      the V3.2 DSA layer at 128K and 256K tokens over every GPU of the host, each with its profiler timeline split
#      by collective (docs/context_parallel.md, "Overlap");
#   3. the same cases on a baseline tree (BASE, default .dbg/base: another commit's dsa_dist/ and kernels/ with this
#      tree's benchmarks/), tag "overlap_before" — the baseline measured in the same session on the same GPUs.
# Results: $OUT/cp_scaling_overlap_{after,before}.{json,md} and logs.tar.gz.
# Usage: OUT=/some/dir bash benchmarks/gpu_checks_overlap.sh      CPU dry run (2 gloo ranks, tiny): SMOKE=1 ...
# Other cases: CASES=model:32768:2,model:32768:1 REPS=5 TAG=small NCCL_TESTS=0 (tags overlap_small_{after,before}).
# Make the baseline: mkdir -p .dbg/base && git archive COMMIT dsa_dist kernels | tar -x -C .dbg/base &&
#                    cp -r benchmarks .dbg/base/          (and carry .dbg/base to the device)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks_overlap}
TOTAL_S=${TOTAL_S:-540}
SMOKE=${SMOKE:-0}
BASE=${BASE:-.dbg/base}
WORK=${WORK:-/tmp/gpu_checks_overlap_work}
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK"
SITE=""
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  SITE=/tmp/site
fi
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1  # device rule: no NVLink multicast
PY=${PY:-python3}
ROOT=$PWD

if [ "$SMOKE" = 1 ]; then
  GPUS=2
  EXTRA=(--smoke)
  CASES=model:512:2:none,layer:512:2,model:1024:2:full
else
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$WORK/device.txt"
  GPUS=$(nvidia-smi -L | wc -l)
  EXTRA=()
  CASES=${CASES:-model:131072:$GPUS:none,layer:131072:$GPUS,model:262144:$GPUS:full,layer:262144:$GPUS}
fi
REPS=${REPS:-2}
TAG=${TAG:+_$TAG}

pack() {
  cp "$WORK"/cp_scaling_*.json "$WORK"/cp_scaling_*.md "$OUT"/ 2>/dev/null
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude './cp_scaling_*' .
}

step() {  # step NAME SECONDS DIR CMD...: run CMD in DIR (its sources first on the path) with a time limit
  local name=$1 limit=$2 dir=$3; shift 3
  echo "=== $name in $dir (limit ${limit}s, at ${SECONDS}s)"
  (cd "$dir" && PYTHONPATH="${SITE:+$SITE:}$PWD" timeout "$limit" "$@") >"$WORK/$name.log" 2>&1
  echo "=== $name exit $? after ${SECONDS}s total"
  grep -v "Warning\|warn(" "$WORK/$name.log" | tail -n 30
  pack
}

left() {  # seconds of TOTAL_S left after reserving $1 (at least 60)
  local s=$(( TOTAL_S - SECONDS - $1 ))
  echo $(( s < 60 ? 60 : s ))
}

[ "$SMOKE" = 1 ] || [ "${NCCL_TESTS:-1}" = 0 ] || step nccl_tests 150 "$ROOT" "$PY" -m pytest -q -p no:cacheprovider tests/multigpu

bench() {  # bench TAG DIR PORT LIMIT
  step "cp_$1" "$4" "$2" "$PY" -m torch.distributed.run --nproc-per-node "$GPUS" --master-addr 127.0.0.1 \
    --master-port "$3" benchmarks/cp_scaling.py --out "$WORK" "${EXTRA[@]}" --tag "$1" --mode allgather \
    --overlap --reps "$REPS" --cases "$CASES" --budget-s $(( $4 - 40 )) --hang-dump-s 150 --pg-timeout-s 120
}
bench "overlap${TAG}_after" "$ROOT" 29621 "$(left 200)"
if [ -d "$BASE/dsa_dist" ]; then
  bench "overlap${TAG}_before" "$BASE" 29622 "$(left 0)"
else
  echo "no baseline tree at $BASE: skipped"
fi
echo "done after ${SECONDS}s"
