#!/usr/bin/env bash
# One command on a 4-GPU host (≤ 9 minutes wall, TOTAL_S): the NCCL context-parallel tests, then the scaling rows
# still missing (docs/context_parallel.md, "Measuring hidden communication" and "Long contexts, measured"):
#   1. tests/multigpu (NCCL correctness, ~1.5 min);
#   2. one benchmark run (tag "overlap", top-k mode allgather, every case with the profiler-timeline overlap):
#      the timeline cases first — the small model at 128K on CP=4 and the V3.2 layer at 512K on CP=4 (chrome
#      traces of every rank kept) — then the V3.2 layer at 128K on CP=1 and CP=2, the small model at 1M tokens on
#      CP=4 with full recompute (predicted from the measured 512K row: skipped with the reason unless it fits
#      --mem-gib), the dense V3.2 layer at 128K on CP=4 and CP=1 (each started only if its predicted time fits);
#   3. last, in its own run (tag "ring"), the V3.2 layer at 512K on CP=4 with the ring top-k, which hung once:
#      every rank's Python stacks are dumped if the case runs past --hang-dump-s (and on SIGTERM), NCCL's flight
#      recorder writes each rank's last collectives on a watchdog timeout (nccl_trace_rank_*).
# Every step runs under `timeout`. The device tool returns at most 8 files from $OUT, so everything is written to
# $WORK and packed into $OUT after every step: cp_scaling_{overlap,ring}.{json,md}, logs.tar.gz (NAME.log of each
# step, per-rank stdout/stderr under rank_logs/, device.txt, NCCL flight-recorder dumps) and traces.tar.gz (the
# chrome traces; rank 0's alone when all would exceed 15 MiB).
# Usage: OUT=/some/dir bash benchmarks/gpu_checks_multi.sh 2>&1 | tee $OUT/summary.log   (wheels from .whl/ first)
# CPU dry run of the same steps (2 gloo ranks, tiny lengths, no NCCL tests): SMOKE=1 bash benchmarks/gpu_checks_multi.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks_multi}
TOTAL_S=${TOTAL_S:-560}  # the whole script's wall-clock budget
SMOKE=${SMOKE:-0}
WORK=${WORK:-/tmp/gpu_checks_multi_work}  # emptied first: a rerun on a warm machine packs only its own files
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
# Device rule: no NVLink multicast (NVLS) in NCCL or in torch's symmetric memory.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
PY=${PY:-python3}

pack() {  # copy the results and pack the logs and traces into $OUT (≤ 8 files come back from there)
  cp "$WORK"/cp_scaling_*.json "$WORK"/cp_scaling_*.md "$OUT"/ 2>/dev/null
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude ./traces --exclude './cp_scaling_*' .
  if [ -d "$WORK/traces" ]; then
    tar -czf "$OUT/traces.tar.gz" -C "$WORK" traces
    if [ "$(stat -c %s "$OUT/traces.tar.gz")" -gt $(( 15 * 1024 * 1024 )) ]; then
      (cd "$WORK" && tar -czf "$OUT/traces.tar.gz" traces/*_rank0.json.gz)
    fi
  fi
}

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $WORK/NAME.log, pack
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s, at ${SECONDS}s)"
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  echo "=== $name exit $? after ${SECONDS}s total"
  tail -n 25 "$WORK/$name.log"
  pack
}

left() {  # seconds of TOTAL_S left after reserving $1 (at least 60)
  local s=$(( TOTAL_S - SECONDS - $1 ))
  echo $(( s < 60 ? 60 : s ))
}

if [ "$SMOKE" = 1 ]; then
  GPUS=2
  SMOKE_ARG=(--smoke)
  # the same steps at tiny lengths on 2 gloo ranks (CP ≤ 2)
  OVERLAP_CASES=model:512:2:none,layer:512:2,layer:256:1,layer:256:2,model:1024:2:full,dense_layer:256:2,dense_layer:256:1
  TRACE_CASES=(model:512:2 layer:512:2)
  RING_CASE=layer:512:2:none:ring
  PRIOR=()
else
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$WORK/device.txt"
  GPUS=$(nvidia-smi -L | wc -l)
  SMOKE_ARG=()
  OVERLAP_CASES=model:131072:4:none,layer:524288:4,layer:131072:1,layer:131072:2,model:1048576:4:full,dense_layer:131072:4,dense_layer:131072:1
  TRACE_CASES=(model:131072:4 layer:524288:4)
  RING_CASE=layer:524288:4:none:ring
  # the measured rows that predict memory and time of the longer cases (the 1M model from the 512K row)
  PRIOR=(--prior benchmarks/results/cp_scaling_h100x4_long.json benchmarks/results/cp_scaling_h100x4_long2.json
         benchmarks/results/cp_scaling_h100x4_long3.json)
  step nccl_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/multigpu
fi

cp_scaling() {  # cp_scaling NAME PORT ARGS...: sets CMD to cp_scaling.py on all GPUs, per-rank logs kept
  local name=$1 port=$2; shift 2
  CMD=("$PY" -m torch.distributed.run --nproc-per-node "$GPUS" --master-addr 127.0.0.1 --master-port "$port"
       --log-dir "$WORK/rank_logs/$name" --tee 3 benchmarks/cp_scaling.py --out "$WORK" "${SMOKE_ARG[@]}" "$@")
}

# 2. timeline + missing rows; ~110 s stay for the ring run and ~90 s for the memory profile. --budget-s: no case starts that is predicted to end
# later than this (seconds after the benchmark's start, which is ~30 s after the launch).
LIMIT=$(left 200)
cp_scaling cp_overlap 29611 --tag overlap --mode allgather --overlap --reps 2 \
  --overlap-trace "${TRACE_CASES[@]}" --cases "$OVERLAP_CASES" "${PRIOR[@]}" --budget-s $(( LIMIT - 40 )) \
  --guess-dense-tflops 46 --hang-dump-s 150 --pg-timeout-s 120
step cp_overlap "$LIMIT" "${CMD[@]}"

# 3. the ring at 512K last, with the hang diagnostics armed early (a healthy run takes ~20 s): stacks of every
# rank after 50 s in the case, NCCL's watchdog after 60 s in one collective, its flight recorder and desync report.
LIMIT=$(left 90)
cp_scaling cp_ring 29612 --tag ring --mode ring --overlap --reps 2 --cases "$RING_CASE" \
  --budget-s $(( LIMIT - 40 )) --hang-dump-s 50 --pg-timeout-s 60
# (flight-recorder variables under both names: torch 2.11 on the GPU image, newer torch renamed them)
step cp_ring "$LIMIT" env TORCH_FR_BUFFER_SIZE=2000 TORCH_NCCL_TRACE_BUFFER_SIZE=2000 \
  TORCH_FR_DUMP_ON_TIMEOUT=1 TORCH_NCCL_DUMP_ON_TIMEOUT=1 \
  TORCH_FR_DUMP_TEMP_FILE="$WORK/nccl_trace_rank_" TORCH_NCCL_DEBUG_INFO_TEMP_FILE="$WORK/nccl_trace_rank_" \
  TORCH_NCCL_DESYNC_DEBUG=1 NCCL_DEBUG=WARN "${CMD[@]}"
# 4. where the memory of the 512K model step goes: the CUDA allocator's history replayed, live blocks at the peak
# by allocation site (benchmarks/memory_account.py --device cuda; skipped in the CPU dry run).
if [ "$SMOKE" != 1 ]; then
  step memory "$(left 0)" "$PY" -m torch.distributed.run --nproc-per-node "$GPUS" --master-addr 127.0.0.1 \
    --master-port 29613 benchmarks/memory_account.py --device cuda --part model --lengths 524288 \
    --recompute full --mode allgather --top 25 --out "$WORK"
  cp "$WORK"/memory_*.json "$OUT"/ 2>/dev/null
fi
echo "done after ${SECONDS}s"
