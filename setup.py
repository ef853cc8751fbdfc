"""Build of gpt2fast's native extensions.

- gpt2fast._bpe (C++17, pybind11) always builds; it needs no torch and no GPU.
- gpt2fast._cuda_ops builds ahead of time only when torch with CUDA and nvcc are present at build time
  (`pip install --no-build-isolation .`); otherwise it is compiled on first use on a GPU machine.
The sources of both are listed once, in gpt2fast/_native_sources.py.
"""
import os
import runpy
import shutil

from pybind11.setup_helpers import Pybind11Extension, ParallelCompile
from pybind11.setup_helpers import build_ext as pybind11_build_ext
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = runpy.run_path(os.path.join(HERE, "gpt2fast", "_native_sources.py"))

ParallelCompile("MAX_JOBS", default=0).install()


def bpe_extension():
    return Pybind11Extension(
        SOURCES["BPE_EXTENSION"],
        SOURCES["BPE_SOURCES"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )


def cuda_extension():
    """The CUDA extension when this build can compile it, else None (normal on machines without a GPU)."""
    if not SOURCES["CUDA_SOURCES"] or os.environ.get("GPT2FAST_NO_CUDA_BUILD") == "1":
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError:
        return None
    if torch.version.cuda is None or CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return None
    return CUDAExtension(
        SOURCES["CUDA_EXTENSION"],
        SOURCES["CUDA_SOURCES"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )


ext_modules = [bpe_extension()]
cmdclass = {"build_ext": pybind11_build_ext}
cuda = cuda_extension()
if cuda is not None:
    from torch.utils.cpp_extension import BuildExtension

    ext_modules.append(cuda)
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
