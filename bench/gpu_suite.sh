#!/usr/bin/env bash
# One short run of every GPU measurement behind the performance targets (docs: bench/README.md).
#
#   bash bench/gpu_suite.sh [OUT_DIR]        # paper size; about 8 minutes on an H100/H200, 9 at most
#   PRESET=tiny bash bench/gpu_suite.sh /tmp/x   # the same chain at the tiny size (a smoke run, CPU too)
#
# Needs torch, monai, numpy, pandas, tqdm and this repository (PYTHONPATH is set to it). Writes one JSON per
# script to OUT_DIR (default bench/results) named <script>-<machine>.json; a part that fails or
# runs past its time limit leaves its log beside the JSON files and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-bench/results}
PRESET=${PRESET:-paper}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DUPLUS_NO_PROGRESS=1
mkdir -p "$OUT_DIR"
if command -v nvidia-smi >/dev/null 2>&1; then
    # "NVIDIA H100 80GB HBM3" -> nvidia-h100, "NVIDIA A100-SXM4-80GB" -> nvidia-a100 (NVL, PCIe stay named)
    MACHINE=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-' | sed 's/[^a-z0-9.-]//g' \
        | sed -E 's/-[0-9]+gb//g; s/-hbm[0-9e]*//g; s/-sxm[0-9]*//g')
else
    MACHINE="cpu$(nproc)"
fi
[ "$PRESET" = paper ] || MACHINE="$MACHINE-$PRESET"

# The whole suite stops at DEADLINE seconds (remote GPU commands often run under a 10-minute cap): a part
# gets what is left of its limit, and is skipped when under 20 s remain. Parts run in order of
# what the targets need: training, inference, batch 8, loader; roofline (CPU-only) can be rerun anywhere.
DEADLINE=${DEADLINE:-540}
part() {  # part SCRIPT NAME LIMIT_SECONDS ARGS...: run bench/SCRIPT.py, keep its JSON as NAME or its log
    local script=$1 name=$2 limit=$3; shift 3
    local json="$OUT_DIR/$name-$MACHINE.json" log="$OUT_DIR/$name-$MACHINE.log"
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "== $name skipped: ${left}s left of the ${DEADLINE}s deadline" >&2
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "== $name (at most ${limit}s)" >&2
    local started=$SECONDS
    if timeout "$limit" "$PYTHON" "bench/$script.py" "$@" >"$json.tmp" 2>"$log"; then
        mv "$json.tmp" "$json" && rm -f "$log"
        echo "   done in $((SECONDS - started))s: $json" >&2
    elif [ -s "$json.tmp" ] && "$PYTHON" -c 'import json, sys; json.load(open(sys.argv[1]))' "$json.tmp" 2>/dev/null; then
        mv "$json.tmp" "$json"  # stopped at its limit, but printed what it had measured (train_step does)
        echo "   CUT at its limit after $((SECONDS - started))s; partial results kept: $json (log: $log)" >&2
    else
        rm -f "$json.tmp"
        echo "   FAILED after $((SECONDS - started))s; last lines of $log:" >&2
        tail -5 "$log" >&2
    fi
}

if [ "$PRESET" = paper ]; then
    # Batch 2: every precision and layout; batch 8 (the paper's): the channels-last compiled step.
    # --profile: two more steps under the profiler, time per kernel category (convolution,
    # layout transpose, norm, ...), which is what the next change to the step has to go on.
    part train_step train_step 260 --preset paper --batch 2 --steps 10 \
        --variants eager-fp32 eager-bf16 eager-bf16-cl compiled-bf16 compiled-bf16-cl \
        --profile eager-bf16 eager-bf16-cl compiled-bf16 compiled-bf16-cl
    part inference inference 120 --preset paper --prompts 1 8 32
    part train_step train_step_b8 120 --preset paper --batch 8 --steps 6 --variants compiled-bf16-cl \
        --profile compiled-bf16-cl
    part loader loader 60 --preset paper --workers 8 --no-train \
        --compare "$OUT_DIR/train_step-$MACHINE.json" "$OUT_DIR/train_step_b8-$MACHINE.json"
    part roofline roofline 40 --preset paper --batch 2 --compare "$OUT_DIR/train_step-$MACHINE.json"
    part roofline roofline_b8 40 --preset paper --batch 8 --compare "$OUT_DIR/train_step_b8-$MACHINE.json"
else
    part train_step train_step 120 --preset tiny --steps 2 --warmup 1 --variants eager-fp32 eager-fp32-cl \
        --profile eager-fp32-cl
    part inference inference 120 --preset tiny --size 64 64 64 --prompts 1 8
    part roofline roofline 60 --preset tiny --patch 32 32 32 --compare "$OUT_DIR/train_step-$MACHINE.json"
    part loader loader 60 --preset tiny --batches 4 --no-train --compare "$OUT_DIR/train_step-$MACHINE.json"
fi
