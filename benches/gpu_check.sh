#!/usr/bin/env bash
# One-shot validation and measurement of sigvlp on one GPU (planned for a bare 16-core H200: <= 6 minutes).
#
#   benches/gpu_check.sh [OUT_DIR] [--dry-run]
#
# Stages, each with a time cap inside one overall budget (GPU_CHECK_BUDGET, default 360 s):
#   1. environment: python, torch, triton, nvcc, nvidia-smi; stops here (exit 2) without a GPU
#   2. build csrc/ with this machine's nvcc: pip install --no-build-isolation --no-deps -e .
#      (SIGVLP_CUDA_ARCHS defaults to this GPU's arch, e.g. 90a on an H100/H200; 4 cores), and at
#      the same time python -m sigvlp.precompile --gpu-check on the other cores: every Triton
#      variant the later stages launch (the ops' self-test cases and OpSpec.launch_configs) compiled
#      into Triton's cache (TRITON_CACHE_DIR, default WORK/triton-cache), so that nothing later
#      compiles while it is timed; the summary counts the kernels compiled after it (should be 0)
#   Every stage runs under timeout: SIGINT at its cap (pytest still writes its JUnit file, so
#   partial counts are kept), SIGKILL 15 s later; exit 124 is reported as TIMED OUT.
#   --dry-run prints the plan: per stage its seconds (precompile: variant counts from
#   `python -m sigvlp.precompile --count --gpu-check` times sigvlp.precompile.COMPILE_CPU_SECONDS,
#   measured per kernel family, times HOST_FACTOR, over the jobs; no stage is cut short) and the total.
#   3. python -m sigvlp.selftest (every backend of every op, fp32/fp16/bf16, vs fp64 oracles)
#   4. every GPU test: pytest -m gpu over the test files that have GPU tests
#   5. the bench suite in full mode, one pytest run per bench file (a slow file cannot take the
#      others down), torch.compile-based providers deselected for time (GPU_CHECK_BENCH_K)
#   6. summary: pass/fail counts and the key ratios (attention vs rope3d + varlen attention,
#      Newton-Schulz vs torch.optim.Muon, sigmoid loss vs dense, model step vs unfused, encoder)
# OUT_DIR (default $OUT, else ./gpu_check_out) receives at most 8 files: summary.txt,
# gpu_check.log (everything printed), results.csv (all bench rows), selftest.txt,
# flops_vs_slices.png/.csv and all.tar.gz (per-stage logs, JUnit XML, each bench file's results
# folder with its pytest-benchmark JSON and plots). Exit status: 0 all passed, 1 failures,
# 2 no GPU / cannot start.
set -u -o pipefail

DRY_RUN=0
OUT_DIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) OUT_DIR="$arg" ;;
  esac
done
OUT_DIR="${OUT_DIR:-${OUT:-gpu_check_out}}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET="${GPU_CHECK_BUDGET:-360}"
# the cores the plan is for (nproc without OMP_NUM_THREADS, which it would obey); the CPU walk
# (GPU_CHECK_FORCE_CPU=1) keeps the 16-core GPU host's plan, its caps scaled (see below)
NPROC=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
CORES="${GPU_CHECK_CORES:-$( (( ${GPU_CHECK_FORCE_CPU:-0} )) && echo 16 || echo "$NPROC")}"
BENCH_K="${GPU_CHECK_BENCH_K-not flex and not dense_compile}"
WORK="${GPU_CHECK_WORK:-$(mktemp -d /tmp/sigvlp_gpu_check.XXXXXX)}"
START=$(date +%s)
mkdir -p "$OUT_DIR" "$WORK/logs" "$WORK/results"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
cd "$REPO"

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
cap() {  # cap SECONDS: min(SECONDS, budget left - 15 s reserved for the summary)
  local l=$(( $(left) - 15 )); (( l < $1 )) && echo $(( l > 0 ? l : 1 )) || echo "$1"
}
STATUS=()  # "stage|result" lines for the summary
record() { STATUS+=("$1|$2"); say "$1: $2"; }
run_stage() {  # run_stage NAME SECONDS CMD... ; output to logs/NAME.log and the main log
  local name=$1 secs; secs=$(cap "$2"); shift 2
  say "stage $name (cap ${secs}s): $*"
  local t0=$(date +%s)
  timeout -s INT --kill-after=15 "$secs" "$@" > >(tee "$WORK/logs/$name.log" >> "$LOG") 2>&1
  local rc=$?
  TOOK[$name]=$(( $(date +%s) - t0 ))
  (( rc == 124 || rc == 137 )) && { say "stage $name: TIMED OUT after ${secs}s"; TIMED_OUT[$name]=1; }
  return $rc
}
declare -A TOOK=() TIMED_OUT=() PLAN_S=()
timed_out() { [[ -n "${TIMED_OUT[$1]:-}" ]] && echo " (TIMED OUT at its cap: partial)"; }

# ----------------------------------------------------------------------------- 1. environment
say "repo $REPO, output $OUT_DIR, budget ${BUDGET}s, python $PY"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import platform
try:
    import torch
    print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"cuda available: {torch.cuda.is_available()}"
          + (f", device: {torch.cuda.get_device_name()} sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
             if torch.cuda.is_available() else ""))
except ImportError as e:
    print(f"torch not importable: {e}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton not installed")
for name in ("pytest", "pytest_benchmark", "matplotlib", "nanobind", "scikit_build_core", "einops", "safetensors",
             "numpy", "nibabel", "pydicom"):
    try:
        __import__(name)
    except ImportError:
        print(f"missing python package: {name}")
EOF
command -v nvcc >/dev/null && nvcc --version | tail -n 2 | tee -a "$LOG" || say "nvcc: not on PATH"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"

# ----------------------------------------------------------------------------- the plan
# Stage caps (s). precompile's is computed: variant counts x measured compile seconds / jobs.
BUILD_CORES="${CMAKE_BUILD_PARALLEL_LEVEL:-4}"  # the CUDA build's cores (its parallel level) beside the precompile
JOBS=$(( CORES > 2 * BUILD_CORES ? CORES - BUILD_CORES : (CORES > 1 ? CORES - 1 : 1) ))
EST="$(env -u TRITON_INTERPRET "$PY" -m sigvlp.precompile --count --gpu-check --arch 90 --jobs "$JOBS" 2>>"$LOG" | tee -a "$LOG" | tail -n 1)"
PRE_S=$(echo "$EST" | sed -n 's/^estimate: \([0-9]*\) s.*/\1/p'); PRE_S=${PRE_S:-999}
PLAN_S[selftest]=30; PLAN_S[gpu_tests]=75; PLAN_S[summary]=10
# Bench order and caps come from `_bench.py plan` (each op's bench and cap are in its OpSpec,
# sigvlp.ops.registry; the other benches' in _bench.OTHER_BENCH_CAPS): key ratios' benches first.
declare -A BENCH_CAP=(); BENCH_FILES=()
while read -r name cap; do
  [[ -f "benches/$name.py" ]] && { BENCH_FILES+=("benches/$name.py"); BENCH_CAP[$name]=$cap; }
done < <("$PY" benches/_bench.py plan 2>>"$LOG")
if (( ! ${#BENCH_FILES[@]} )); then  # the plan printed nothing: every bench file, 10 s each
  for f in benches/bench_*.py; do BENCH_FILES+=("$f"); done
fi
for f in "${BENCH_FILES[@]}"; do n=$(basename "$f" .py); PLAN_S[$n]=${BENCH_CAP[$n]:-10}; done
PLAN_ORDER=(build+precompile selftest gpu_tests $(for f in "${BENCH_FILES[@]}"; do basename "$f" .py; done) summary)
# build+precompile: the estimate + 10 s, at least 100 s (the CUDA build of one arch runs beside it);
# never cut to fit: a plan over the budget says so.
PLAN_S[build+precompile]=$(( PRE_S + 10 > 100 ? PRE_S + 10 : 100 ))
PLAN_TOTAL=0; for st in "${PLAN_ORDER[@]}"; do PLAN_TOTAL=$(( PLAN_TOTAL + PLAN_S[$st] )); done
say "plan for $CORES cores (precompile with $JOBS jobs beside a $BUILD_CORES-core CUDA build: $EST):"
say "  assumed: one core of this host compiles as fast as the loaded 2-vCPU machine that measured"
say "  COMPILE_CPU_SECONDS ($(grep -o 'HOST_FACTOR [0-9.]*' <<< "$EST"), conservative), and the CUDA build of one arch ends within 100 s"
for st in "${PLAN_ORDER[@]}"; do say "$(printf '  %-24s %4d s' "$st" "${PLAN_S[$st]}")"; done
say "total: $PLAN_TOTAL s$( (( PLAN_TOTAL > BUDGET )) && echo " (OVER the ${BUDGET} s budget: later stages will be cut short)")"
if (( DRY_RUN )); then
  exit 0
fi

FORCE_CPU="${GPU_CHECK_FORCE_CPU:-0}"  # 1: walk every stage on a CPU (tests this script; no build)
BENCH_MODE=full
if (( FORCE_CPU )); then
  say "GPU_CHECK_FORCE_CPU=1: running the stages on the CPU (no build, smallest quick benches) to test this script"
  BENCH_MODE=quick
  export SIGVLP_BENCH_SMOKE=1  # the benches' smallest shapes and one timing round (benches/_bench.py smoke)
  # the CPU is slower than the GPU the caps are planned for: every cap and the budget times this
  # and each stage's fixed start-up (python, torch, pytest, matplotlib; a fresh process per RSS
  # measurement) is added: about a minute on a loaded 2-core machine
  CPU_SCALE="${GPU_CHECK_CPU_SCALE:-4}"; CPU_STARTUP="${GPU_CHECK_CPU_STARTUP:-60}"
  for st in "${!PLAN_S[@]}"; do PLAN_S[$st]=$(( PLAN_S[$st] * CPU_SCALE + CPU_STARTUP )); done
  BUDGET=$(( BUDGET * CPU_SCALE + ${#PLAN_S[@]} * CPU_STARTUP ))
  say "caps x$CPU_SCALE + ${CPU_STARTUP} s on the CPU (GPU_CHECK_CPU_SCALE, GPU_CHECK_CPU_STARTUP): budget ${BUDGET}s"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  say "NEEDS A GPU: torch sees no CUDA device (torch.cuda.is_available() is False), so there is nothing to"
  say "validate here. Run this script on a machine with an NVIDIA GPU (sm_80 or newer) and nvcc on PATH;"
  say "on a CPU-only machine use 'python -m sigvlp.selftest' and 'pytest benches/' (quick mode) instead."
  exit 2
fi
if (( ! FORCE_CPU )) && ! command -v nvcc >/dev/null; then
  say "NEEDS nvcc: no CUDA compiler on PATH (or set CUDACXX); the CUDA backends cannot be built"
  exit 2
fi

# ----------------------------------------------------------------------------- 2. build + precompile
# precompile runs in the background beside the build (nvcc uses a few cores; Triton's compiles the rest)
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$WORK/triton-cache}"
PRE_ARGS=(--gpu-check --jobs "$JOBS"); (( FORCE_CPU )) && PRE_ARGS=(--gpu-check --jobs 2 --arch 90 --ops rope3d --match selftest)  # CPU: exercise it
run_stage precompile "${PLAN_S[build+precompile]}" env -u TRITON_INTERPRET "$PY" -m sigvlp.precompile "${PRE_ARGS[@]}" &
PRE_PID=$!
if (( FORCE_CPU )); then
  record build "SKIPPED (GPU_CHECK_FORCE_CPU=1)"
else
if [[ -z "${SIGVLP_CUDA_ARCHS:-}" ]]; then
  SIGVLP_CUDA_ARCHS="$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}' + ('a' if M == 9 else ''))")"
  export SIGVLP_CUDA_ARCHS
fi
say "building csrc/ for SIGVLP_CUDA_ARCHS=$SIGVLP_CUDA_ARCHS"
export CMAKE_BUILD_PARALLEL_LEVEL="$BUILD_CORES"
export SIGVLP_BUILD_EMU=OFF  # the CPU emulation module serves CPU tests only: not built on the GPU machine
if run_stage build "${PLAN_S[build+precompile]}" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . \
   && "$PY" -c "from sigvlp.ops import cuda_module; import sys; r = cuda_module.unavailable_reason(); print('CUDA backend:', r or 'available'); sys.exit(1 if r else 0)" 2>&1 | tee -a "$LOG"; then
  record build "PASS$(timed_out build)"
else
  record build "FAIL$(timed_out build) (see logs/build.log; the CUDA backends will be skipped below)"
fi
fi
wait "$PRE_PID"; PRE_RC=$?
TOOK[precompile]=$(sed -n 's/^precompiled .* in \([0-9.]*\) s.*/\1/p' "$WORK/logs/precompile.log" | cut -d. -f1)
if (( PRE_RC == 0 )); then
  record precompile "PASS ($(grep '^precompiled' "$WORK/logs/precompile.log"))"
else
  record precompile "FAIL rc=$PRE_RC$( (( PRE_RC == 124 || PRE_RC == 137 )) && echo ' (TIMED OUT: the rest compiles on first use)')"
fi
cubins() { find "$TRITON_CACHE_DIR" -name '*.cubin' 2>/dev/null | sort; }
cubins > "$WORK/cubins_after_precompile.txt"

# ----------------------------------------------------------------------------- 3. self-test
if run_stage selftest "${PLAN_S[selftest]}" "$PY" -m sigvlp.selftest --json "$WORK/selftest.json"; then
  record selftest "PASS ($(tail -n 1 "$WORK/logs/selftest.log"))"
else
  record selftest "FAIL$(timed_out selftest) ($(grep -c ' FAIL ' "$WORK/logs/selftest.log") failing lines; $(tail -n 1 "$WORK/logs/selftest.log"))"
fi
cp "$WORK/logs/selftest.log" "$OUT_DIR/selftest.txt" 2>/dev/null

# ----------------------------------------------------------------------------- 4. GPU tests
TIMEOUT_OPT=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT=(--timeout=90)
XDIST_OPT=()
"$PY" -c "import xdist" 2>/dev/null && (( NPROC > 2 )) && XDIST_OPT=(-n "$(( NPROC < 8 ? NPROC : 8 ))")  # one GPU: 8 workers at most
mapfile -t GPU_TESTS < <(grep -l 'mark.gpu' tests/test_*.py)
run_stage gpu_tests "${PLAN_S[gpu_tests]}" "$PY" -m pytest -p no:cacheprovider -q -m gpu -rfE "${TIMEOUT_OPT[@]}" \
  "${XDIST_OPT[@]}" --junitxml="$WORK/gpu_tests.xml" "${GPU_TESTS[@]}"
res="$("$PY" benches/_bench.py junit "$WORK/gpu_tests.xml")$(timed_out gpu_tests)"
[[ "$res" == "passed 0,"* ]] && (( ! FORCE_CPU )) && res="FAIL: every GPU test was skipped ($res)"
record gpu_tests "$res"

# ----------------------------------------------------------------------------- 5. benches
for f in "${BENCH_FILES[@]}"; do
  name=$(basename "$f" .py)
  if (( $(left) < 20 )); then record "$name" "NOT RUN (budget spent)"; continue; fi
  KOPT=(); [[ -n "$BENCH_K" ]] && KOPT=(-k "$BENCH_K")
  run_stage "$name" "${PLAN_S[$name]}" "$PY" -m pytest -p no:cacheprovider -q --bench-mode=$BENCH_MODE \
    --bench-out="$WORK/results/$name" --junitxml="$WORK/results/$name.xml" "${TIMEOUT_OPT[@]}" "${KOPT[@]}" "$f"
  rc=$?
  res="$("$PY" benches/_bench.py junit "$WORK/results/$name.xml")"
  (( rc == 124 || rc == 137 )) && res="FAIL: timed out at its cap (the rows measured before are kept in results.csv)"
  record "$name" "$res"
done

# ----------------------------------------------------------------------------- 6. summary
"$PY" benches/_bench.py merge "$OUT_DIR/results.csv" "$WORK"/results/*/results.csv >> "$LOG" 2>&1
for f in flops_vs_slices.png flops_vs_slices.csv; do
  cp "$WORK/results/bench_flops_vs_slices/$f" "$OUT_DIR/" 2>/dev/null
done
{
  echo "sigvlp gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START )) s"
  "$PY" -c "import torch; print(torch.cuda.get_device_name(), '| torch', torch.__version__, end=' | ')
import triton; print('triton', triton.__version__)" 2>/dev/null
  echo
  printf '  %-24s %8s %8s  %s\n' stage "plan s" "took s" result
  for s in "${STATUS[@]}"; do
    st="${s%%|*}"; plan="${PLAN_S[$st]:-${PLAN_S[build+precompile]}}"
    printf '  %-24s %8s %8s  %s\n' "$st" "$plan" "${TOOK[$st]:--}" "${s#*|}"
  done
  echo "  plan total: $PLAN_TOTAL s$( (( FORCE_CPU )) && echo " (the GPU plan; the CPU walk's caps above are scaled)"); took: $(( $(date +%s) - START )) s"
  late=$(cubins | comm -13 "$WORK/cubins_after_precompile.txt" -)
  echo "  Triton kernels compiled after precompile: $(grep -c . <<< "$late") (0: every launch of the stages was precompiled)"
  [[ -n "$late" ]] && echo "$late" | xargs -n1 basename | sort | uniq -c | sed 's/^/    /'
  echo
  echo "per op and dtype (selftest over the backends, GPU tests passed/failed, bench medians):"
  "$PY" benches/_bench.py table "$OUT_DIR/results.csv" "$WORK/selftest.json" "$WORK/gpu_tests.xml"
  echo
  "$PY" benches/_bench.py ratios "$OUT_DIR/results.csv"
} > "$OUT_DIR/summary.txt" 2>&1
tar czf "$OUT_DIR/all.tar.gz" --exclude=./triton-cache -C "$WORK" . 2>/dev/null
cat "$OUT_DIR/summary.txt" | tee -a "$LOG"
FAILED=0
for s in "${STATUS[@]}"; do [[ "${s#*|}" == PASS* || "${s#*|}" == passed* || "${s#*|}" == SKIPPED* ]] || FAILED=1; done
say "done: $([[ $FAILED == 0 ]] && echo 'everything passed' || echo 'some stages did not pass (see above)')"
exit $FAILED
