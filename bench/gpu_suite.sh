#!/usr/bin/env bash
# One short run of every GPU measurement behind the performance targets (docs: bench/README.md).
#
#   bash bench/gpu_suite.sh [OUT_DIR]        # paper size; about 8 minutes on an H100/H200, 9 at most
#   PRESET=tiny bash bench/gpu_suite.sh /tmp/x   # the same chain at the tiny size (a smoke run, CPU too)
#
# Needs torch, monai, numpy, pandas, tqdm and this repository (PYTHONPATH is set to it). A machine
# without monai and without a package index gets it from wheels in .whl/ (WHEELS; bench/fetch_wheels.sh
# downloads them elsewhere): they are installed before anything runs. Writes one JSON per script
# to OUT_DIR (default bench/results) named <script>-<machine>.json; a part that fails or runs past
# its time limit has its log appended to suite-<machine>.log and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-bench/results}
PRESET=${PRESET:-paper}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DUPLUS_NO_PROGRESS=1
mkdir -p "$OUT_DIR"

# Checked before any part runs: without these every part fails within seconds, and the machine
# time would buy nothing. Missing modules come from carried wheels where there are any.
missing_modules() {  # prints the names that cannot be imported ("python" when the interpreter fails)
    "$PYTHON" -c 'import importlib.util, sys
def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:
        return False
print(" ".join(m for m in sys.argv[1:] if not found(m)))' torch monai numpy pandas tqdm || echo python
}
WHEELS=${WHEELS:-.whl}
missing=$(missing_modules)
if [ -n "$missing" ] && [ "$missing" != python ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "== installing $WHEELS/*.whl for: $missing" >&2
    # Into the interpreter's own environment, so that pytest run afterwards finds them too; where
    # that is not writable, into a folder on PYTHONPATH for this suite only.
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check "$WHEELS"/*.whl; then
        site="${TMPDIR:-/tmp}/duplus-site"
        if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
                --upgrade --target "$site" "$WHEELS"/*.whl; then
            export PYTHONPATH="$PYTHONPATH:$site"
            echo "   installed into $site: export PYTHONPATH=\$PYTHONPATH:$site for the tests" >&2
        fi
    fi
    missing=$(missing_modules)
fi
if [ -n "$missing" ]; then
    echo "missing Python modules: $missing (no package index here? run bench/fetch_wheels.sh where pip works and bring $WHEELS/ along)" >&2
    exit 3
fi
if [ "$PRESET" = paper ] && [ -z "${ALLOW_CPU:-}" ] \
        && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    # The paper size on a CPU would spend every part's limit and measure nothing.
    echo "torch sees no CUDA GPU: the paper-size suite needs one (ALLOW_CPU=1 runs it anyway)" >&2
    exit 4
fi

if command -v nvidia-smi >/dev/null 2>&1; then
    # "NVIDIA H100 80GB HBM3" -> nvidia-h100, "NVIDIA A100-SXM4-80GB" -> nvidia-a100 (NVL, PCIe stay named)
    MACHINE=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-' | sed 's/[^a-z0-9.-]//g' \
        | sed -E 's/-[0-9]+gb//g; s/-hbm[0-9e]*//g; s/-sxm[0-9]*//g')
else
    MACHINE="cpu$(nproc)"
fi
[ "$PRESET" = paper ] || MACHINE="$MACHINE-$PRESET"
SUITE_LOG="$OUT_DIR/suite-$MACHINE.log"
rm -f "$SUITE_LOG"

# The whole suite stops at DEADLINE seconds (remote GPU commands often run under a 10-minute cap): a part
# gets what is left of its limit, and is skipped when under 20 s remain. Parts run in order of
# what the targets need: training, inference, batch 8, loader; roofline (CPU-only) can be rerun anywhere.
DEADLINE=${DEADLINE:-540}
GRACE=10  # seconds a part gets after its SIGTERM to print what it measured, before it is killed
part() {  # part SCRIPT NAME LIMIT_SECONDS ARGS...: run bench/SCRIPT.py, keep its JSON as NAME or its log
    local script=$1 name=$2 limit=$3; shift 3
    local json="$OUT_DIR/$name-$MACHINE.json" log="$OUT_DIR/$name-$MACHINE.log.tmp"
    local left=$((DEADLINE - SECONDS - GRACE))
    if [ "$left" -lt 20 ]; then
        echo "== $name skipped: $((DEADLINE - SECONDS))s left of the ${DEADLINE}s deadline" | tee -a "$SUITE_LOG" >&2
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "== $name (at most ${limit}s)" >&2
    local started=$SECONDS
    # --kill-after: a process that hangs on its way out (compiler workers, loader workers) must
    # not hold up the parts after it.
    if timeout --kill-after="$GRACE" "$limit" "$PYTHON" "bench/$script.py" "$@" >"$json.tmp" 2>"$log"; then
        mv "$json.tmp" "$json"
        echo "   done in $((SECONDS - started))s: $json" >&2
    elif [ -s "$json.tmp" ] && "$PYTHON" -c 'import json, sys; json.load(open(sys.argv[1]))' "$json.tmp" 2>/dev/null; then
        mv "$json.tmp" "$json"  # stopped at its limit, but printed what it had measured
        echo "   CUT at its limit after $((SECONDS - started))s; partial results kept: $json (log: $SUITE_LOG)" >&2
        { echo "== $name: cut at its limit (${limit}s)"; cat "$log"; } >>"$SUITE_LOG"
    else
        rm -f "$json.tmp"
        echo "   FAILED after $((SECONDS - started))s; last lines of its log ($SUITE_LOG):" >&2
        tail -5 "$log" >&2
        { echo "== $name: failed after $((SECONDS - started))s"; cat "$log"; } >>"$SUITE_LOG"
    fi
    # One log for the whole suite: a machine may hand back only a few files.
    rm -f "$log"
}

if [ "$PRESET" = paper ]; then
    # Batch 2: every precision and layout; batch 8 (the paper's): the channels-last compiled step.
    # --profile: two more steps under the profiler, time per kernel category (convolution,
    # layout transpose, norm, ...), which is what the next change to the step has to go on.
    # Variants in the order the targets need them, in case the limit cuts the last: the fp32
    # baseline, then the step most likely to be fastest, then the comparisons that explain it.
    part train_step train_step 260 --preset paper --batch 2 --steps 10 \
        --variants eager-fp32 compiled-bf16-cl compiled-bf16 eager-bf16 eager-bf16-cl \
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
