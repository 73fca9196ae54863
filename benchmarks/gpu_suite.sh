#!/usr/bin/env bash
# The whole GPU check in one command, for a lent CUDA machine (H100/H200, no network):
#
#   bash benchmarks/gpu_suite.sh OUTDIR      run it: OUTDIR gets <op>.csv files and gpu_suite.log
#   bash benchmarks/gpu_suite.sh --plan      print the steps and their time budgets, run nothing
#
# Steps: refuse unless CUDA is present (nvidia-smi and torch.cuda.is_available(), checked
# before anything is installed); `pip install --no-build-isolation --no-deps -e .` (torch and
# triton are preinstalled there; the CUDA extension is built for this GPU's architecture unless
# VQIM_CUDA_ARCHS is set; if that install fails, once more without the extension so the Triton
# paths still get checked); the `gpu`-marked tests; every benchmarks/bench_*.py with --save.
# Each step runs under `timeout` with its own budget (the budgets add up to 8 minutes at most),
# a failing or timed-out step is recorded and the suite goes on. Everything printed is also
# written to OUTDIR/gpu_suite.log, which ends with one summary line per step.
#
# The benchmarks run from a temporary copy of benchmarks/ whose results/ folder is OUTDIR, so
# their CSVs (this run's rows only, with device, date and commit) land in OUTDIR and the
# checkout's benchmarks/results/ is left alone.
#
# Exit status: 0 every step passed, 1 some step failed or timed out, 2 usage, 3 no CUDA.
# Environment: PYTHON (interpreter, default python or python3), VQIM_CUDA_ARCHS, VQIM_COMMIT (the
# CSVs' commit column; default the checkout's short git HEAD: give it for a copy without .git).

set -u
set -o pipefail

readonly TOTAL_BUDGET_S=480   # wall-clock bound of the whole suite, seconds
readonly KILL_AFTER_S=1       # grace between timeout's TERM and KILL, per step

# --------------------------------------------------------------------------- the plan
# Budgets in seconds. Sum of all budgets + KILL_AFTER_S per step must stay <= TOTAL_BUDGET_S
# (tests/test_gpu_suite.py checks it through --plan).
readonly BUDGET_NVIDIA_SMI=5
readonly BUDGET_TORCH_CUDA=25
readonly BUDGET_INSTALL=90
readonly BUDGET_INSTALL_NO_EXT=15   # runs only when the install failed
readonly BUDGET_ENV=10
readonly BUDGET_TESTS=64

# Every benchmarks/bench_*.py, in the order they run, with its budget. The decode step first:
# it is the number the product is judged by.
readonly BENCHES=(
    "bench_decode_step:56"
    "bench_add_rms_norm:8"
    "bench_rope_decode_attention:10"
    "bench_codebook_lookup:15"
    "bench_cfg_sample:25"
    "bench_conv_attention:25"
    "bench_adafactor8:15"
    "bench_generate:18"
    "bench_demo:8"
    "bench_tp:13"
    "bench_serving:12"
    "bench_scheduler:13"
    "bench_parallel_decoding:26"
    "bench_superres:7"
)

# Arguments of one benchmark besides --save (sized to its budget); sets BENCH_ARGS.
bench_args() {
    case "$1" in
        # Starts no new case after 38 s (the compiled modes come last), so it ends within budget;
        # Parti-350M and the public models' shapes (Janus-Pro-1B, LlamaGen-XL).
        bench_decode_step) BENCH_ARGS=(--presets parti-350m janus-pro-1b llamagen-c2i-xl --batch 1 16 --budget-s 38) ;;
        bench_add_rms_norm) BENCH_ARGS=(--dtype bf16) ;;
        bench_rope_decode_attention) BENCH_ARGS=(--dtype bf16) ;;
        bench_codebook_lookup) BENCH_ARGS=(--dtype bf16) ;;
        bench_cfg_sample) BENCH_ARGS=(--dtype bf16) ;;
        # The visited-work table is an exact count on the CPU, the same on every machine.
        bench_conv_attention) BENCH_ARGS=(--no-work) ;;
        bench_adafactor8) BENCH_ARGS=(--dtype fp32) ;;
        # One preset and batch: each mode times 3 whole 1024-token images.
        bench_generate) BENCH_ARGS=(--presets parti-350m --batch 4) ;;
        bench_demo) BENCH_ARGS=(--batch 1 16) ;;
        # One GPU: TP > 1 would be skipped anyway; the gloo collective count still runs.
        bench_tp) BENCH_ARGS=(--presets parti-350m --tp 1 --batch 1) ;;
        bench_serving) BENCH_ARGS=(--clients 1 16) ;;
        # The loop's host work per step against the bare step (20 steps of each, then cancelled).
        bench_scheduler) BENCH_ARGS=(--models parti-350m --batch 1 16 --iters 20 --rounds 1) ;;
        # One 1024-token image per method (random weights: passes and time, the wavefront's tokens
        # checked against raster's).
        bench_parallel_decoding) BENCH_ARGS=(--models parti-350m --images 1) ;;
        # The module runs on the CPU (its CPU ms per image is the figure); 12 held-out scenes.
        bench_superres) BENCH_ARGS=(-n 12 --iters 3) ;;
        *) return 1 ;;
    esac
}

usage() {
    echo "usage: bash benchmarks/gpu_suite.sh OUTDIR | --plan   (OUTDIR receives the CSVs and gpu_suite.log)"
}

print_plan() {
    local total=0 steps=0 entry name budget
    printf '%-28s %8s  %s\n' "step" "budget_s" "command"
    printf '%-28s %8s  %s\n' "preflight-nvidia-smi" "$BUDGET_NVIDIA_SMI" "nvidia-smi -L"
    printf '%-28s %8s  %s\n' "preflight-torch-cuda" "$BUDGET_TORCH_CUDA" \
        "python -c 'import torch; assert torch.cuda.is_available()'"
    printf '%-28s %8s  %s\n' "install" "$BUDGET_INSTALL" "pip install --no-build-isolation --no-deps -e ."
    printf '%-28s %8s  %s\n' "install-no-ext" "$BUDGET_INSTALL_NO_EXT" \
        "VQIM_SKIP_CUDA_BUILD=1 pip install ... (only if install failed)"
    printf '%-28s %8s  %s\n' "env" "$BUDGET_ENV" "versions of python, torch, triton, vqim._C"
    printf '%-28s %8s  %s\n' "tests-gpu" "$BUDGET_TESTS" "TRITON_INTERPRET=0 python -m pytest -m gpu -q --continue-on-collection-errors"
    total=$((BUDGET_NVIDIA_SMI + BUDGET_TORCH_CUDA + BUDGET_INSTALL + BUDGET_INSTALL_NO_EXT + BUDGET_ENV + BUDGET_TESTS))
    steps=6
    for entry in "${BENCHES[@]}"; do
        name="${entry%%:*}"
        budget="${entry##*:}"
        bench_args "$name" || BENCH_ARGS=("?")
        printf '%-28s %8s  %s\n' "$name" "$budget" "python benchmarks/$name.py --save ${BENCH_ARGS[*]}"
        total=$((total + budget))
        steps=$((steps + 1))
    done
    printf '%-28s %8s  %s\n' "total" "$total" \
        "+ ${KILL_AFTER_S}s kill grace x ${steps} steps = $((total + KILL_AFTER_S * steps))s <= ${TOTAL_BUDGET_S}s"
}

# --------------------------------------------------------------------------- arguments

if [ "$#" -ne 1 ] || [ -z "${1:-}" ]; then
    usage >&2
    exit 2
fi
case "$1" in
    -h | --help)
        usage
        exit 0
        ;;
    --plan)
        print_plan
        exit 0
        ;;
    -*)
        echo "gpu_suite.sh: error: unknown option $1" >&2
        usage >&2
        exit 2
        ;;
esac

START_S=$SECONDS
REPO="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)" || exit 2
if ! mkdir -p -- "$1" 2>/dev/null; then
    echo "gpu_suite.sh: error: cannot create OUTDIR '$1'" >&2
    exit 2
fi
OUTDIR="$(cd -- "$1" && pwd)" || exit 2
LOG="$OUTDIR/gpu_suite.log"
: >"$LOG" || {
    echo "gpu_suite.sh: error: cannot write $LOG" >&2
    exit 2
}

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
fi

# --------------------------------------------------------------------------- CUDA, before anything else

refuse() {
    local msg="gpu_suite.sh: error: no CUDA GPU ($1); this suite runs only on a CUDA machine, nothing was installed or run"
    echo "$msg" >&2
    echo "$msg" >>"$LOG"
    exit 3
}

if ! command -v nvidia-smi >/dev/null 2>&1; then
    refuse "nvidia-smi is not on PATH"
fi
GPU_LIST="$(timeout --kill-after="$KILL_AFTER_S" "$BUDGET_NVIDIA_SMI" nvidia-smi -L 2>&1 </dev/null)"
rc=$?
if [ "$rc" -ne 0 ]; then
    refuse "nvidia-smi -L failed with status $rc: $(printf '%s' "$GPU_LIST" | head -n 1)"
fi
timeout --kill-after="$KILL_AFTER_S" "$BUDGET_TORCH_CUDA" \
    "$PY" -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1 </dev/null
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    refuse "'$PY -c \"import torch\"' did not finish within ${BUDGET_TORCH_CUDA}s"
elif [ "$rc" -ne 0 ]; then
    refuse "torch.cuda.is_available() is not True under $PY (status $rc)"
fi
PREFLIGHT_S=$((SECONDS - START_S))

# --------------------------------------------------------------------------- steps

SUMMARY=()
FAILED=0

# step NAME BUDGET_S CMD...: run CMD from the repository root under timeout, record the outcome.
step() {
    local name="$1" budget="$2"
    shift 2
    local left=$((TOTAL_BUDGET_S - (SECONDS - START_S) - KILL_AFTER_S))
    if [ "$budget" -gt "$left" ]; then
        budget="$left"
    fi
    if [ "$budget" -lt 5 ]; then
        echo "=== [$name] SKIPPED: the suite's ${TOTAL_BUDGET_S}s are spent"
        SUMMARY+=("$(printf '%-24s %-22s %4ss of %4ss' "$name" "SKIPPED (no time left)" 0 "$budget")")
        FAILED=$((FAILED + 1))
        return 1
    fi
    echo
    local shown="${*//$'\n'/ }"
    if [ "${#shown}" -gt 160 ]; then shown="${shown:0:157}..."; fi
    echo "=== [$name] start $(date -u '+%H:%M:%S') UTC, budget ${budget}s: $shown"
    local t0=$SECONDS rc
    (cd -- "$REPO" && timeout --kill-after="$KILL_AFTER_S" "$budget" "$@" </dev/null)
    rc=$?
    local dt=$((SECONDS - t0)) status
    if [ "$rc" -eq 0 ]; then
        status="ok"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="TIMEOUT (status $rc)"
    else
        status="FAILED (status $rc)"
    fi
    echo "=== [$name] $status after ${dt}s"
    SUMMARY+=("$(printf '%-24s %-22s %4ss of %4ss' "$name" "$status" "$dt" "$budget")")
    if [ "$rc" -ne 0 ]; then
        FAILED=$((FAILED + 1))
    fi
    return "$rc"
}

skipped() {
    SUMMARY+=("$(printf '%-24s %-22s' "$1" "not run ($2)")")
}

ENV_REPORT='
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "|", torch.cuda.get_device_name(0), "| capability", ".".join(map(str, torch.cuda.get_device_capability(0))))
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
import importlib.util as u
need = ["pytest", "hypothesis", "numpy", "safetensors", "sentencepiece", "PIL", "tqdm"]
print("missing python packages:", [m for m in need if u.find_spec(m) is None] or "none")
import vqim.kernels._ext as ext
print("vqim.kernels._C:", "built" if ext.available() else "NOT built (backend=cuda paths will fail)")
'

main() {
    echo "gpu_suite: $(date -u '+%Y-%m-%d %H:%M:%S') UTC, repo $REPO, OUTDIR $OUTDIR"
    if [ -n "${VQIM_COMMIT:-}" ]; then
        echo "gpu_suite: commit $VQIM_COMMIT (from VQIM_COMMIT)"
    else
        VQIM_COMMIT="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)" || VQIM_COMMIT=unknown
        echo "gpu_suite: commit $VQIM_COMMIT (from git; VQIM_COMMIT=<hash> names it for a copy without .git)"
    fi
    # The benchmarks run from a copy of benchmarks/ outside the checkout: their CSVs' commit
    # column comes from here (benchmarks/_common.py reads VQIM_COMMIT before asking git).
    export VQIM_COMMIT
    echo "gpu_suite: python $PY ($(command -v "$PY" 2>/dev/null || echo 'not on PATH'))"
    echo "gpu_suite: CUDA present (preflight ${PREFLIGHT_S}s):"
    printf '%s\n' "$GPU_LIST"

    export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
    if [ -z "${VQIM_CUDA_ARCHS:-}" ]; then
        local cap
        cap="$(timeout 5 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null </dev/null | head -n 1 | tr -d ' .')"
        if [[ "$cap" =~ ^[0-9]+$ ]]; then
            export VQIM_CUDA_ARCHS="$cap"
        fi
    fi
    echo "gpu_suite: VQIM_CUDA_ARCHS=${VQIM_CUDA_ARCHS:-<setup.py default>}"

    # 1. Install (offline: no index, no dependencies, the preinstalled build tools).
    if step install "$BUDGET_INSTALL" \
        "$PY" -m pip install -v --no-index --no-build-isolation --no-deps -e .; then
        skipped install-no-ext "the install succeeded"
    else
        step install-no-ext "$BUDGET_INSTALL_NO_EXT" env VQIM_SKIP_CUDA_BUILD=1 \
            "$PY" -m pip install --no-index --no-build-isolation --no-deps -e .
    fi
    step env "$BUDGET_ENV" "$PY" -c "$ENV_REPORT"

    # 2. The gpu-marked tests (tests/conftest.py skips them without CUDA; here CUDA is present).
    # A test module that cannot be imported (a package missing here) must not stop the others.
    step tests-gpu "$BUDGET_TESTS" env TRITON_INTERPRET=0 \
        "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors

    # 3. Every benchmark, from a copy of benchmarks/ whose results/ is OUTDIR.
    local work
    work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")" || {
        echo "gpu_suite: error: mktemp failed"
        return 1
    }
    # shellcheck disable=SC2064  # expand $work now: it is local to main
    trap "rm -rf -- '$work'" EXIT
    mkdir -p -- "$work/benchmarks"
    cp -- "$REPO"/benchmarks/*.py "$work/benchmarks/"
    ln -s -- "$OUTDIR" "$work/benchmarks/results"

    local f base known entry
    for f in "$REPO"/benchmarks/bench_*.py; do
        base="$(basename -- "$f" .py)"
        known=0
        for entry in "${BENCHES[@]}"; do
            if [ "${entry%%:*}" = "$base" ]; then known=1; fi
        done
        if [ "$known" -eq 0 ]; then
            echo "gpu_suite: WARNING: benchmarks/$base.py is not in this suite's plan (add it to BENCHES)"
            skipped "$base" "not in the plan"
            FAILED=$((FAILED + 1))
        fi
    done
    local name budget
    for entry in "${BENCHES[@]}"; do
        name="${entry%%:*}"
        budget="${entry##*:}"
        bench_args "$name"
        step "$name" "$budget" "$PY" "$work/benchmarks/$name.py" --save "${BENCH_ARGS[@]}"
    done

    echo
    echo "gpu_suite: CSVs in $OUTDIR:"
    ls -l -- "$OUTDIR"/*.csv 2>/dev/null || echo "  (none)"
    echo
    echo "gpu_suite: summary (step, outcome, time of budget), total $((SECONDS - START_S))s of ${TOTAL_BUDGET_S}s"
    local line
    for line in "${SUMMARY[@]}"; do
        echo "gpu_suite: $line"
    done
    if [ "$FAILED" -eq 0 ]; then
        echo "gpu_suite: PASS, every step ok"
        return 0
    fi
    echo "gpu_suite: FAIL, $FAILED step(s) not ok"
    return 1
}

main 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
