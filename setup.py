"""Build of gpt2fast's native extensions.

- gpt2fast._bpe (C++17, pybind11) always builds; it needs no torch and no GPU.
- gpt2fast._cuda_ops builds ahead of time only when torch with CUDA and nvcc (of torch's CUDA major version) are
  present at build time (`pip install --no-build-isolation .`); otherwise it is compiled on first use on a GPU
  machine (gpt2fast/ops/_cuda_loader.py). GPT2FAST_NO_CUDA_BUILD=1 skips it; TORCH_CUDA_ARCH_LIST picks the
  architectures (default: the visible GPUs, else 7.0;8.0;9.0+PTX, with 7.5 for 7.0 where nvcc has dropped
  Volta); MAX_JOBS bounds the parallel compile jobs of both extensions (ninja for the CUDA one).
- Every wheel carries the CUDA sources under gpt2fast/_csrc/, for that first-use compile.
The sources of both are listed once, in gpt2fast/_native_sources.py.
"""
import os
import re
import runpy
import shutil
import subprocess

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from pybind11.setup_helpers import build_ext as pybind11_build_ext
from setuptools import setup
from setuptools.command.build_py import build_py

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


def _note(msg):
    print(f"gpt2fast setup: {msg}", flush=True)


def _nvcc_facts(nvcc):
    """(release as (major, minor) or None, sorted list of the compute capabilities it can build, e.g. [75, 80])."""
    release, archs = None, []
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
        m = re.search(r"release (\d+)\.(\d+)", out)
        if m:
            release = (int(m.group(1)), int(m.group(2)))
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
        archs = sorted(int(a) for a in re.findall(r"compute_(\d+)", out))
    except (OSError, subprocess.SubprocessError):
        pass
    return release, archs


def _default_arch_list(torch, nvcc_archs):
    """TORCH_CUDA_ARCH_LIST when the user gave none: the visible GPUs, else V100/A100/H100 (+PTX for newer)."""
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    wanted = [70, 80, 90]
    if nvcc_archs and 70 not in nvcc_archs:  # CUDA 13 dropped Volta: its oldest (7.5) stands in
        oldest = nvcc_archs[0]
        _note(f"nvcc cannot build sm_70 (V100); building sm_{oldest} for pre-Ampere GPUs instead")
        wanted[0] = oldest
    if nvcc_archs:
        wanted = [a for a in wanted if a in nvcc_archs]
    arch = [f"{a // 10}.{a % 10}" for a in wanted]
    if arch:
        arch[-1] += "+PTX"  # PTX of the newest, for GPUs newer than any listed
    return ";".join(arch)


def cuda_extension():
    """The CUDA extension when this build can compile it, else None (normal on machines without a GPU)."""
    if not SOURCES["CUDA_SOURCES"] or os.environ.get("GPT2FAST_NO_CUDA_BUILD") == "1":
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError:
        return None  # a build without torch (pip's build isolation): the CUDA ops compile on first use
    if torch.version.cuda is None or CUDA_HOME is None:
        return None
    nvcc = shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin"))
    if nvcc is None:
        return None
    release, nvcc_archs = _nvcc_facts(nvcc)
    torch_major = int(torch.version.cuda.split(".")[0])
    if release is not None and release[0] != torch_major:
        _note(f"skipping the CUDA ops: nvcc is CUDA {release[0]}.{release[1]} but torch was built with CUDA "
              f"{torch.version.cuda}; they compile on first use once a matching toolkit is found (CUDA_HOME)")
        return None
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = _default_arch_list(torch, nvcc_archs)
    _note(f"building gpt2fast._cuda_ops for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
          f"(MAX_JOBS={os.environ.get('MAX_JOBS', 'all cores')}); GPT2FAST_NO_CUDA_BUILD=1 skips it")
    return CUDAExtension(
        SOURCES["CUDA_EXTENSION"],
        SOURCES["CUDA_SOURCES"],
        extra_compile_args={"cxx": list(SOURCES["CUDA_CXX_FLAGS"]), "nvcc": list(SOURCES["CUDA_NVCC_FLAGS"])},
    )


class build_py_with_cuda_sources(build_py):
    """build_py that also copies the CUDA sources and headers into the package as gpt2fast/_csrc/..., so a
    wheel can compile them on first use. Editable installs read them from csrc/ in the checkout instead."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "gpt2fast", SOURCES["PACKAGED_CSRC_DIR"])
        for rel in SOURCES["CUDA_SOURCES"] + SOURCES["CUDA_HEADERS"]:
            assert rel.startswith("csrc/"), rel
            dest = os.path.join(target, rel[len("csrc/"):])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            self.copy_file(os.path.join(HERE, rel), dest)


ext_modules = [bpe_extension()]
cmdclass = {"build_ext": pybind11_build_ext, "build_py": build_py_with_cuda_sources}
cuda = cuda_extension()
if cuda is not None:
    from torch.utils.cpp_extension import BuildExtension

    ext_modules.append(cuda)
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
