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

# CUDA kernels (csrc/kernels/*.cu) and their bindings join here; built by setup.py when torch with CUDA
# and nvcc are present at install time, otherwise compiled on first use on a GPU machine.
CUDA_EXTENSION = "gpt2fast._cuda_ops"
CUDA_SOURCES: list = []
