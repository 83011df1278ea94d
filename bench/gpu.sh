#!/usr/bin/env bash
# Benchmarks 1-3 of issue 14 on CUDA, bounded in time, one JSON line per figure on stdout.
#
#   bench/gpu.sh                 # CUDA: full sizes of 1 (fine-tune step), 2 (extraction), 3 (whole upgrade)
#   BENCH_GPU_BUDGET_S=300 bench/gpu.sh
#
# On CUDA: RSAE_BENCH_DEVICE=cuda, so the fine-tune peers and the SAELens trainer run on the GPU, the extraction
# host model is bfloat16, the rational gate takes its compiled path (RSAE_GATE_IMPL=compiled). Each benchmark
# runs under `timeout` with its share of the budget (default 480 s in all); one that runs out prints a
# {"bench": ..., "name": "timed_out"} line and the next one runs. Without CUDA it prints
# {"cuda": false, ...} and runs the quick CPU mode of the same benchmarks instead, so the script is tested here.
# Python: $PYTHON, else .venv/bin/python, else python3.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
[ -z "$PY" ] && { [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; }
BUDGET="${BENCH_GPU_BUDGET_S:-480}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  export RSAE_BENCH_DEVICE=cuda RSAE_GATE_IMPL=compiled
  MODE=""
  "$PY" -c 'import json, torch; print(json.dumps({"cuda": True, "device": torch.cuda.get_device_name(0), "torch": torch.__version__}))'
else
  MODE="--quick"
  "$PY" -c 'import json, torch; print(json.dumps({"cuda": False, "torch": torch.__version__, "note": "CUDA is absent: running the quick CPU mode of benchmarks 1-3"}))'
fi

# shares of the budget: fine-tune step 40%, extraction 25%, upgrade 35%
for spec in "finetune_step:40" "extraction:25" "upgrade:35"; do
  mod="${spec%%:*}"; share="${spec##*:}"
  limit=$(( BUDGET * share / 100 ))
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" "bench/$mod.py" $MODE 2> "/tmp/rsae-gpu-$mod.log" | grep '^{'
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "{\"bench\": \"$mod\", \"name\": \"timed_out\", \"limit_s\": $limit}"
  elif [ "$rc" != 0 ]; then
    echo "{\"bench\": \"$mod\", \"name\": \"failed\", \"rc\": $rc, \"log\": \"/tmp/rsae-gpu-$mod.log\"}"
  fi
done
