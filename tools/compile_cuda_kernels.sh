#!/usr/bin/env bash
# Compile check of the CUDA C++ kernels, for machines without a GPU (CI): every csrc/kernels/*.cu is compiled
# with one `nvcc -c` for all of sm_70 (or, where this nvcc has dropped Volta, its oldest architecture), sm_80,
# sm_90 and compute_90 PTX at once, as the extension build compiles it, warnings as errors, into a temporary
# directory that is removed afterwards. Then, when the installed torch ships its CUDA headers, the binding
# (csrc/bindings/cuda_ops.cpp) is syntax-checked against them.
#
#   bash tools/compile_cuda_kernels.sh          # NVCC=/path/to/nvcc, JOBS=4 to override
#
# Fails (exit 1) on any compile error, and when there is no nvcc (GPT2FAST_SKIP_WITHOUT_NVCC=1 skips instead).
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  if [[ "${GPT2FAST_SKIP_WITHOUT_NVCC:-0}" == 1 ]]; then
    echo "compile_cuda_kernels: no nvcc; skipped (GPT2FAST_SKIP_WITHOUT_NVCC=1)" >&2
    exit 0
  fi
  echo "compile_cuda_kernels: no nvcc on PATH (or /usr/local/cuda/bin): install the CUDA toolkit, set NVCC, or" \
       "set GPT2FAST_SKIP_WITHOUT_NVCC=1 to skip this check" >&2
  exit 1
fi
JOBS=${JOBS:-2}

# The architectures of setup.py's default TORCH_CUDA_ARCH_LIST, "7.0;8.0;9.0+PTX": sm_70 (V100), sm_80 (A100),
# sm_90 (H100), and compute_90 PTX for newer GPUs. CUDA 13 dropped sm_70 (its oldest is sm_75): then, as in
# setup.py, the oldest one it has stands in for Volta, so the no-bf16 code path is still compiled.
supported=$("$NVCC" --list-gpu-arch 2>/dev/null | sed -n 's/^compute_\([0-9]*\)$/\1/p' | sort -n | tr '\n' ' ')
if [[ -z "$supported" ]]; then echo "compile_cuda_kernels: '$NVCC --list-gpu-arch' listed nothing" >&2; exit 1; fi
archs=()
if [[ " $supported " == *" 70 "* ]]; then
  archs+=(70)
else
  oldest=$(echo "$supported" | awk '{print $1}')
  echo "compile_cuda_kernels: this nvcc has no sm_70; sm_${oldest} stands in for the pre-Ampere (no bf16) build"
  archs+=("$oldest")
fi
for a in 80 90; do
  if [[ " $supported " == *" $a "* ]]; then archs+=("$a"); else
    echo "compile_cuda_kernels: this nvcc cannot build sm_$a (it has: $supported)" >&2; exit 1
  fi
done

# The -gencode flags, as torch.utils.cpp_extension._get_cuda_arch_flags makes them from TORCH_CUDA_ARCH_LIST
# (mirrored here, so that no torch is needed): arch=compute_N,code=sm_N per entry, plus arch=compute_N,
# code=compute_N for the "+PTX" one (the newest), sorted and deduplicated. All of them go to one nvcc call per
# file, as in the extension build: only such a call defines __CUDA_ARCH_LIST__ with commas ("750,800,900"),
# which once broke `pip install` while a check compiling one architecture per call passed.
gencode=()
for a in "${archs[@]}"; do gencode+=("-gencode=arch=compute_$a,code=sm_$a"); done
gencode+=("-gencode=arch=compute_${archs[-1]},code=compute_${archs[-1]}")
mapfile -t gencode < <(printf '%s\n' "${gencode[@]}" | LC_ALL=C sort -u)

out=$(mktemp -d "${TMPDIR:-/tmp}/gpt2fast-cuda-XXXXXX")
trap 'rm -rf "$out"' EXIT

sources=(csrc/kernels/*.cu)
echo "compile_cuda_kernels: $("$NVCC" --version | tail -1); ${#sources[@]} files, each for" \
     "$(printf "sm_%s " "${archs[@]}")+ compute_${archs[-1]} PTX in one call ($JOBS jobs)"
start=$(date +%s)

# One job per file. The flags are the extension's (torch's COMMON_NVCC_FLAGS: the __CUDA_NO_HALF* macros and
# --expt-relaxed-constexpr; -fPIC; gpt2fast/_native_sources.py's CUDA_NVCC_FLAGS), so what passes here also
# builds inside the extension, plus -Werror=all-warnings, which turns every nvcc and cicc warning into an error,
# and -Xcompiler -Wall,-Wextra,-Werror, which does the same for the host compiler's pass.
export NVCC out
export GENCODE="${gencode[*]}"
compile_one() {
  local src=$1
  local obj="$out/$(basename "$src" .cu).o"
  local -a gencode
  read -r -a gencode <<<"$GENCODE"
  if ! "$NVCC" -c "$src" -o "$obj" \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -Xcompiler -fPIC \
      -O3 -std=c++17 -lineinfo "${gencode[@]}" \
      -Werror=all-warnings -Xcompiler -Wall,-Wextra,-Werror 2>"$obj.log"; then
    echo "FAILED: $src (${gencode[*]})" >&2
    cat "$obj.log" >&2
    return 1
  fi
  echo "  ok  $src  ($(( $(date +%s) - start ))s since the start)"
}
export -f compile_one
export start
echo "  nvcc ... ${gencode[*]}"
status=0
printf '%s\n' "${sources[@]}" | xargs -P "$JOBS" -n 1 bash -c 'compile_one "$0"' || status=1
echo "compile_cuda_kernels: kernels took $(( $(date +%s) - start ))s"
if [[ $status -ne 0 ]]; then echo "compile_cuda_kernels: FAILED" >&2; exit 1; fi

# The binding needs torch's CUDA headers (the CPU wheel ships them) and the CUDA runtime headers. The CPU wheel
# lacks c10/cuda/impl/cuda_cmake_macros.h, a configure-time file: C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it.
PY=${PYTHON:-python3}
torch_dir=$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null || true)
if [[ -z "$torch_dir" ]]; then
  echo "compile_cuda_kernels: torch is not importable: binding not checked"
elif [[ ! -f "$torch_dir/include/c10/cuda/CUDAStream.h" || ! -f "$torch_dir/include/torch/extension.h" ]]; then
  echo "compile_cuda_kernels: this torch has no CUDA headers ($torch_dir/include/c10/cuda): binding not checked"
else
  start=$(date +%s)
  cuda_inc=""
  for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda; do
    if [[ -n "$home" && -f "$home/include/cuda_runtime.h" ]]; then cuda_inc="$home/include"; break; fi
  done
  if [[ -z "$cuda_inc" ]]; then
    echo "compile_cuda_kernels: no CUDA include directory with cuda_runtime.h (set CUDA_HOME)" >&2; exit 1
  fi
  py_inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  abi=$("$PY" -c 'import torch; print(int(torch.compiled_with_cxx11_abi()))')
  if ! "${CXX:-g++}" -fsyntax-only -std=c++17 -Wall -Wextra -Werror -Wno-unused-parameter \
      -DTORCH_EXTENSION_NAME=_cuda_ops -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI="$abi" \
      -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
      -isystem "$torch_dir/include" -isystem "$torch_dir/include/torch/csrc/api/include" \
      -isystem "$cuda_inc" -isystem "$py_inc" csrc/bindings/cuda_ops.cpp; then
    echo "compile_cuda_kernels: FAILED: csrc/bindings/cuda_ops.cpp" >&2
    exit 1
  fi
  echo "  ok  csrc/bindings/cuda_ops.cpp  (g++ -fsyntax-only against torch $("$PY" -c 'import torch; print(torch.__version__)'), $(( $(date +%s) - start ))s)"
fi
echo "compile_cuda_kernels: all passed"
