#!/usr/bin/env bash
# Everything a lent GPU is needed for, in stages that each fit one device call (10 minutes):
#
#   bash tools/gpu_session.sh build        # editable install (AOT CUDA ops for the visible GPU), ops report
#   bash tools/gpu_session.sh test         # the GPU tests: CUDA kernels, Triton ops at full size, model
#   bash tools/gpu_session.sh bench-ops    # op benchmarks beside their peers -> bench-ops.json/.md/.png
#   bash tools/gpu_session.sh bench-train  # training step and 200-step loss parity -> bench-train.json/.md/.png
#
# Several stages may be given in one call ("build test"). Logs and results go to $OUT (the device tool's
# folder that comes back), else ./gpu_out. A stage's failure is reported and the next stage still runs; the
# exit status is that of the last failing stage. The last lines printed are a short summary, since the device
# tool returns only the end of the output.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
summary=()
status=0

run_stage() {  # name, command...
  local name=$1
  shift
  local start=$SECONDS
  echo "=== $name: $*"
  if "$@" >"$OUT/$name.log" 2>&1; then
    summary+=("$name: ok ($((SECONDS - start)) s)")
  else
    local rc=$?
    status=$rc
    summary+=("$name: FAILED rc=$rc ($((SECONDS - start)) s); see $name.log")
    tail -40 "$OUT/$name.log"
  fi
}

stage_build() {
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton",
triton.__version__, torch.cuda.get_device_name())' >"$OUT/versions.txt" 2>&1
  run_stage build "$PY" -m pip install --no-build-isolation --no-deps -e .
  run_stage ops-info "$PY" -m gpt2fast.ops.info --build
  cp "$OUT/ops-info.log" "$OUT/ops-info.txt" 2>/dev/null || true
}

stage_test() {
  run_stage test-gpu "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda_kernels.py tests/test_ops_adamw.py \
    tests/test_ops_attention.py tests/test_ops_layer_norm.py tests/test_ops_bias_gelu.py \
    tests/test_ops_cross_entropy.py tests/test_ops_backends.py tests/test_model.py
}

bench() {  # name, pytest paths...
  local name=$1
  shift
  run_stage "$name" "$PY" -m pytest -q -p no:cacheprovider "$@" --benchmark-only -s \
    --gpt2fast-json="$OUT/$name.json"
  if [[ -f "$OUT/$name.json" ]]; then
    "$PY" -m gpt2fast.bench report "$OUT/$name.json" --out "$OUT/$name" >/dev/null 2>&1 || true
    # which of ours (triton) / ours (cuda) is faster per op here (printed; `prefer` without --dry-run records it)
    "$PY" -m gpt2fast.bench prefer "$OUT/$name.json" --dry-run >"$OUT/$name.prefer.txt" 2>&1 || true
  fi
}

for stage in "${@:-build}"; do
  case "$stage" in
    build) stage_build ;;
    test) stage_test ;;
    bench-ops) bench bench-ops benchmarks/test_bench_ops_attention.py benchmarks/test_bench_ops_norm_gelu.py \
      benchmarks/test_bench_ops_cross_entropy.py benchmarks/test_bench_ops_adamw.py ;;
    bench-train) bench bench-train benchmarks/test_bench_train.py ;;
    *) echo "gpu_session: unknown stage '$stage' (build, test, bench-ops, bench-train)" >&2; exit 2 ;;
  esac
done

echo "=== summary ($(date -u +%FT%TZ), $(cat "$OUT/versions.txt" 2>/dev/null | tail -1))"
for line in "${summary[@]}"; do echo "  $line"; done
for md in "$OUT"/bench-*.md "$OUT"/bench-*.prefer.txt; do [[ -f "$md" ]] && { echo "--- $(basename "$md")"; cat "$md"; }; done
exit $status
