#!/usr/bin/env bash
# Everything a lent GPU is needed for, in ONE device call that ends within 540 s of the machine's start:
#
#   bash tools/gpu_session.sh              # build, GPU tests, op benchmarks, training benchmark + loss parity
#   bash tools/gpu_session.sh test bench-ops   # only these stages (e.g. a rerun of the ones that failed)
#   bash tools/gpu_session.sh --plan       # each stage with its time budget, then "total: N s"
#   bash tools/gpu_session.sh --dry-run    # no GPU needed: collects everything each stage would run (imports,
#                                          # pytest selections, benchmark ids); exit 0 only if all of it collects
#
# Each stage runs under its budget (below), enforced with `timeout`: a stage over budget is stopped and reported
# as such, and the next stage still runs. The exit status is 1 when any stage failed or ran over.
#
# What comes back: the device tool returns at most 8 files from $OUT, so the stages write their logs to a work
# folder and, after every stage, the script refreshes these (a killed call still leaves the latest):
#   $OUT/summary.md               stage results, versions, GPU, the ops report, auto's decisions, benchmark tables
#   $OUT/logs.tar.gz              every stage's full log, nvidia-smi, the ops report
#   $OUT/bench-ops.json|.png      the op benchmarks beside their peers (python -m gpt2fast.bench report reads it)
#   $OUT/bench-train.json|.png    the training step (ours, plain eager, plain torch.compile) and the loss parity
#   $OUT/backend_decisions.json   what backend="auto" measured and chose per op and shape on this card
# The last lines printed are the summary table (the device tool returns only the end of the output).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# ----------------------------------------------------------------------------------------------- budgets
# Seconds per stage, from figures measured on the CPU dev machine (2 cores) or estimated where only a GPU can
# tell; the device machine has 16 cores.
#   build: `nvcc -O3` for sm_90 alone, one file per core: attention.cu 6 s, layer_norm.cu 11 s,
#     cross_entropy.cu 3 s (measured here); the binding against torch's headers ~45 s and the BPE extension
#     ~25 s on one core (the CPU wheel build); all in parallel under ninja/ParallelCompile: ~60 s, plus the
#     editable install and the ops report (~10 s).                                                  -> 90
#   test: ~440 GPU tests (pytest --collect-only). With GPT2FAST_AUTOTUNE=off each Triton attention key
#     compiles one config per kernel (~40 keys x 3 kernels, 0.8-3 s each at sm_90 for 16-bit; fp32 only at
#     small shapes), spread over 8 xdist workers: ~45 s of compiles; the other Triton kernels ~30 compiles;
#     CUDA-context start per worker ~5 s; the float64 references of the large GPU shapes ~20 s.   -> 150
#   bench-ops: attention (2 shapes x fwd, fwd+bwd) autotunes 23 configs per key, 4 keys: ~90 compiles
#     at ~1 s; the timed runs themselves are milliseconds; LayerNorm/GELU/CE/AdamW compile ~15 kernels
#     and torch.compile's peers ~20 s; the copy/matmul ceilings ~2 s.                              -> 150
#   bench-train: torch.compile of GPT-2 124M ~60 s (torch 2.11, 16 cores); our eager and plain eager
#     steps at ~0.1 s x 15 each; the 200-step loss parity, ours and plain at B8 x T1024 (~0.03 s/step): 15 s;
#     data preparation of the packaged corpus ~5 s; model builds ~10 s.                         -> 140
#   wrap-up: packing the logs and the summary.                                                  -> 10
STAGES=(build test bench-ops bench-train)
declare -A BUDGET=([build]=90 [test]=150 [bench-ops]=150 [bench-train]=140)
WRAPUP=10
for pair in ${GPU_SESSION_BUDGETS:-}; do BUDGET[${pair%%=*}]=${pair#*=}; done  # "test=60 ...": for testing the script
TEST_WORKERS=8        # xdist workers on one GPU: each holds a CUDA context (~0.5 GB) and compiles on a core
TEST_TIMEOUT=120      # seconds per GPU test (pytest-timeout): a hung kernel costs one test, not the stage

GPU_TESTS=(tests/test_ops_attention.py tests/test_ops_layer_norm.py tests/test_ops_bias_gelu.py
           tests/test_ops_cross_entropy.py tests/test_ops_adamw.py tests/test_ops_common.py
           tests/test_ops_backends.py tests/test_ops_dispatch.py tests/test_ops_info.py tests/test_model.py)
BENCH_OPS=(benchmarks/test_bench_attention.py benchmarks/test_bench_layer_norm.py benchmarks/test_bench_bias_gelu.py
           benchmarks/test_bench_cross_entropy.py benchmarks/test_bench_adamw.py)
BENCH_TRAIN=(benchmarks/test_bench_train.py)
# Ours under torch.compile is left out here to keep the stage in budget (a second 124M compile, ~60 s): the
# comparison the goals name is ours beside plain eager and plain torch.compile.
BENCH_TRAIN_SELECT=(-k "not gpt2fast-compile")

mode=run
stages=()
for arg in "$@"; do
  case "$arg" in
    --plan) mode=plan ;;
    --dry-run) mode=dry ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    build|test|bench-ops|bench-train) stages+=("$arg") ;;
    *) echo "gpu_session: unknown argument '$arg' (stages: ${STAGES[*]}; --plan, --dry-run)" >&2; exit 2 ;;
  esac
done
[[ ${#stages[@]} -eq 0 ]] && stages=("${STAGES[@]}")

if [[ $mode == plan ]]; then
  total=0
  for s in "${stages[@]}"; do printf '%-12s %4d s\n' "$s" "${BUDGET[$s]}"; total=$((total + BUDGET[$s])); done
  printf '%-12s %4d s\n' wrap-up "$WRAPUP"
  echo "total: $((total + WRAPUP)) s"
  exit 0
fi

OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX")
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Tests check correctness, benchmarks speed: no autotuning in the test stage (see gpt2fast/ops/attention.py).
# Each stage keeps auto's decisions in its own file; the benchmarks' is the one that comes back.
export GPT2FAST_BACKEND_CACHE="$WORK/decisions-unset.json"
summary=()
status=0

have_gpu() { "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
if [[ $mode == run ]] && ! have_gpu; then
  echo "gpu_session: no CUDA GPU is visible here (torch.cuda.is_available() is False); on a machine without" \
       "one, run 'bash tools/gpu_session.sh --dry-run' to check what the GPU stages would run" >&2
  exit 2
fi

deadline=0
within() {  # command...: runs it with what is left of the current stage's budget
  local left=$((deadline - SECONDS))
  if ((left <= 0)); then echo "gpu_session: no time left in this stage for: $*"; return 124; fi
  timeout --signal=TERM --kill-after=5 "$left" "$@"
}

pack() {  # refresh what comes back: the logs in one archive, and the summary
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude='*.json' --exclude='*.png' . 2>/dev/null || true
  {
    echo "# gpu_session $(date -u +%FT%TZ)"
    echo
    cat "$WORK/versions.txt" 2>/dev/null
    echo
    echo "| stage | result |"
    echo "| --- | --- |"
    for line in "${summary[@]}"; do echo "| ${line%%: *} | ${line#*: } |"; done
    for f in "$WORK"/ops-info.txt "$WORK"/decisions.txt "$WORK"/bench-ops.md "$WORK"/bench-train.md; do
      [[ -f "$f" ]] && { echo; echo "## $(basename "$f")"; echo; echo '```'; cat "$f"; echo '```'; }
    done
  } >"$OUT/summary.md"
}

run_stage() {  # name, function
  local name=$1 fn=$2 start=$SECONDS rc
  deadline=$((SECONDS + BUDGET[$name]))
  echo "=== $name (budget ${BUDGET[$name]} s)"
  "$fn" >"$WORK/$name.log" 2>&1
  rc=$?
  local took=$((SECONDS - start))
  if [[ $mode == dry ]]; then
    if ((rc == 0)); then summary+=("$name: collected; skipped: no GPU ($(tail -1 "$WORK/$name.log"))")
    else summary+=("$name: COLLECTION FAILED rc=$rc"); status=1; tail -40 "$WORK/$name.log"; fi
  elif ((rc == 0)); then
    summary+=("$name: ok (${took} s of ${BUDGET[$name]})")
  elif ((rc == 124 || rc == 137)) || ((SECONDS >= deadline)); then
    summary+=("$name: OVER BUDGET, stopped at ${took} s of ${BUDGET[$name]}; see $name.log"); status=1
    tail -25 "$WORK/$name.log"
  else
    summary+=("$name: FAILED rc=$rc (${took} s); see $name.log"); status=1
    tail -40 "$WORK/$name.log"
  fi
  pack
}

collect() {  # pytest args...: collect only; prints "N items"; fails when nothing is collected
  local out
  out=$("$PY" -m pytest --collect-only -q -p no:cacheprovider "$@" 2>&1)
  local rc=$?
  echo "$out"
  local n
  n=$(echo "$out" | grep -c '::')
  if ((rc != 0 || n == 0)); then echo "collection failed (rc=$rc, $n items)"; return 1; fi
  echo "$n items"
}

# --------------------------------------------------------------------------------------------- stages
stage_build() {
  if [[ $mode == dry ]]; then
    "$PY" - <<'EOF' || return 1
import os, runpy
s = runpy.run_path("gpt2fast/_native_sources.py")
files = s["BPE_SOURCES"] + s["CUDA_SOURCES"] + s["CUDA_HEADERS"]
missing = [f for f in files if not os.path.exists(f)]
assert not missing, f"missing sources: {missing}"
import setuptools, pybind11, torch.utils.cpp_extension  # noqa: F401  what the build imports
print(f"{len(files)} native sources present")
EOF
    "$PY" -m gpt2fast.ops.info >/dev/null || return 1
    echo "build: sources and build imports present"
    return 0
  fi
  nvidia-smi >"$WORK/nvidia-smi.txt" 2>&1 || true
  # The visible GPU's architecture only (setup.py's default when a GPU is visible): one nvcc pass per file.
  within "$PY" -m pip install --no-build-isolation --no-deps -e . || return $?
  within "$PY" -m gpt2fast.ops.info --build >"$WORK/ops-info.txt" 2>&1
  local rc=$?
  cat "$WORK/ops-info.txt"
  return $rc
}

stage_test() {
  local args=(-p no:cacheprovider -rfEs --timeout="$TEST_TIMEOUT" "${GPU_TESTS[@]}")
  if [[ $mode == dry ]]; then collect -n 0 "${args[@]}"; return $?; fi
  GPT2FAST_AUTOTUNE=off GPT2FAST_BACKEND_CACHE="$WORK/decisions-tests.json" \
    within "$PY" -m pytest -q -n "$TEST_WORKERS" "${args[@]}" --junitxml="$WORK/test-gpu.xml"
}

bench() {  # name, pytest args...
  local name=$1
  shift
  if [[ $mode == dry ]]; then
    collect "$@" || return 1
    "$PY" -m gpt2fast.bench report --help >/dev/null || return 1
    return 0
  fi
  GPT2FAST_BACKEND_CACHE="$OUT/backend_decisions.json" \
    within "$PY" -m pytest -q -p no:cacheprovider "$@" --benchmark-only -s --gpt2fast-json="$OUT/$name.json"
  local rc=$?
  if [[ -f "$OUT/$name.json" ]]; then
    "$PY" -m gpt2fast.bench report "$OUT/$name.json" --out "$WORK/$name" >/dev/null 2>&1 || true
    [[ -f "$WORK/$name.png" ]] && cp "$WORK/$name.png" "$OUT/$name.png"
  fi
  GPT2FAST_BACKEND_CACHE="$OUT/backend_decisions.json" "$PY" -c \
    'from gpt2fast.ops.info import decision_lines; print("\n".join(decision_lines()))' >"$WORK/decisions.txt" 2>&1
  return $rc
}
stage_bench_ops() { bench bench-ops "${BENCH_OPS[@]}"; }
stage_bench_train() { bench bench-train "${BENCH_TRAIN[@]}" "${BENCH_TRAIN_SELECT[@]}"; }

"$PY" -c 'import torch, platform; t = None
try:
    import triton; t = triton.__version__
except Exception as e: t = f"not importable ({e})"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); triton {t}; Python {platform.python_version()}")' \
  >"$WORK/versions.txt" 2>&1
for s in "${stages[@]}"; do
  case "$s" in
    build) run_stage build stage_build ;;
    test) run_stage test stage_test ;;
    bench-ops) run_stage bench-ops stage_bench_ops ;;
    bench-train) run_stage bench-train stage_bench_train ;;
  esac
done
pack
for md in "$WORK"/bench-ops.md "$WORK"/bench-train.md "$WORK"/decisions.txt; do
  [[ -f "$md" ]] && { echo "--- $(basename "$md")"; cat "$md"; }
done
echo "=== summary ($(date -u +%FT%TZ)): $(cat "$WORK/versions.txt")"
for line in "${summary[@]}"; do echo "  $line"; done
echo "  results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
rm -rf "$WORK"
exit $status
