"""The one list of native sources, read by setup.py (ahead-of-time build) and by the on-first-use
compiler. Paths are relative to the repository root. Keep this file free of imports: setup.py runs it
before the package can be imported."""

BPE_EXTENSION = "gpt2fast._bpe"
BPE_SOURCES = [
    "csrc/bpe/encoder.cpp",
    "csrc/bpe/trainer.cpp",
    "csrc/bpe/vocab_io.cpp",
    "csrc/bindings/bpe_module.cpp",
]

# The CUDA kernels (csrc/kernels/*.cu, pure CUDA C++) and their torch binding. Built by setup.py when torch
# with CUDA and nvcc are present at install time, otherwise compiled on first use on a GPU machine
# (gpt2fast/ops/_cuda_loader.py). tools/compile_cuda_kernels.sh compiles every csrc/kernels/*.cu on machines
# without a GPU; tests/test_ops_info.py checks that each of them is listed here.
CUDA_EXTENSION = "gpt2fast._cuda_ops"
CUDA_SOURCES = [
    "csrc/kernels/layer_norm.cu",
    "csrc/kernels/bias_gelu.cu",
    "csrc/kernels/cross_entropy.cu",
    "csrc/kernels/adamw.cu",
    "csrc/kernels/attention.cu",
    "csrc/bindings/cuda_ops.cpp",
]
CUDA_HEADERS = [
    "csrc/kernels/kernels.h",
    "csrc/kernels/common.cuh",
    "csrc/kernels/attention_impl.cuh",
]
# A wheel carries the CUDA sources and headers under gpt2fast/_csrc/ (csrc/kernels/x.cu -> gpt2fast/_csrc/kernels/
# x.cu), so the on-first-use compiler finds them after a non-editable install. The binding includes
# "../kernels/kernels.h", a path that holds in both layouts.
PACKAGED_CSRC_DIR = "_csrc"
# Flags of both builds. No --use_fast_math: the kernels choose their fast intrinsics (__expf, __fdividef) where
# the error is known to be harmless and keep IEEE division and square roots elsewhere.
CUDA_NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
CUDA_CXX_FLAGS = ["-O3", "-std=c++17"]
