"""Loading gpt2fast's CUDA C++ ops (csrc/kernels, bound in csrc/bindings/cuda_ops.cpp) on this machine.

    from gpt2fast.ops._cuda_loader import load_cuda_ops, cuda_ops_status
    ops = load_cuda_ops()          # the extension module, or None
    status = cuda_ops_status()     # .how ("aot" | "jit" | None) and .reason (why not, when None)

In order: the module built ahead of time by setup.py (``gpt2fast._cuda_ops``); else, on a machine with a CUDA
GPU, torch built with CUDA, nvcc and ninja, a compile on first use with ``torch.utils.cpp_extension.load`` (one
line printed; the build is cached in torch's extension directory, TORCH_EXTENSIONS_DIR, so later runs only load
it); else None, with the reason. ``GPT2FAST_NO_CUDA_JIT=1`` turns the first-use compile off.

Nothing here raises: not at import (this module imports nothing heavy) and not from ``load_cuda_ops``, which
reports a failed import or compile as the reason instead. The op dispatchers (gpt2fast/ops/_dispatch.py) load it
when backend="cuda" is asked for, or when "auto" would measure or take the CUDA path for an op; the ops' custom
operators reach it through gpt2fast.ops._common.cuda_module.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional

from gpt2fast import _native_sources as _src

_NOT_BUILT = "not built at install time (no torch with CUDA and nvcc then)"
JIT_NAME = "gpt2fast_cuda_ops"  # the module name of the first-use build (torch caches it under this name)


@dataclass(frozen=True)
class CudaOpsStatus:
    module: Optional[ModuleType]
    how: Optional[str]      # "aot": built by setup.py; "jit": compiled on first use; None: not available
    reason: Optional[str]   # why not, when module is None; notes (e.g. why the AOT module was not used) otherwise


_lock = threading.Lock()
_status: Optional[CudaOpsStatus] = None


def load_cuda_ops(verbose: bool = False) -> Optional[ModuleType]:
    """The CUDA ops extension module, compiling it on first use where that is possible; None otherwise."""
    return cuda_ops_status(load=True, verbose=verbose).module


def cuda_ops_status(load: bool = True, verbose: bool = False) -> CudaOpsStatus:
    """Where the CUDA ops come from on this machine. With ``load=False`` nothing is compiled: a module that
    would need compiling is reported as how="jit", module None, reason "not compiled yet" (see ``jit_problem``)."""
    global _status
    if _status is not None:
        return _status
    with _lock:
        if _status is not None:
            return _status
        aot, aot_error = _import_aot()
        if aot is not None:
            _status = CudaOpsStatus(aot, "aot", None)
            return _status
        problem = jit_problem()
        if problem is not None:
            # Say why a prebuilt module failed to import; a module that was simply never built is the normal case.
            reason = problem if aot_error == _NOT_BUILT else f"{problem}; the prebuilt module failed: {aot_error}"
            _status = CudaOpsStatus(None, None, reason)
            return _status
        if not load:
            return CudaOpsStatus(None, "jit", "not compiled yet: compiles on first use")
        module, error = _compile(verbose)
        _status = CudaOpsStatus(module, "jit" if module is not None else None, error)
        return _status


def _import_aot():
    try:
        import torch  # noqa: F401  (the extension links against libtorch: load it first)

        return importlib.import_module(_src.CUDA_EXTENSION), None
    except ModuleNotFoundError as e:
        if e.name == _src.CUDA_EXTENSION:
            return None, _NOT_BUILT
        return None, f"{type(e).__name__}: {e}"
    except Exception as e:  # a stale build against another torch: undefined symbols, ABI, ...
        return None, f"{type(e).__name__}: {e}"


def nvcc_path() -> Optional[str]:
    """nvcc of torch's CUDA_HOME (CUDA_HOME / CUDA_PATH or the one on PATH), or None."""
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:
        CUDA_HOME = None
    if CUDA_HOME:
        found = shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin"))
        if found:
            return found
    return shutil.which("nvcc")


def nvcc_release(nvcc: str) -> Optional[str]:
    """The CUDA release nvcc reports ("13.0"), or None when it cannot be run."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def source_files() -> Optional[Dict[str, List[Path]]]:
    """{"sources": [...], "headers": [...]} of the CUDA build, from the wheel's gpt2fast/_csrc or from the
    checkout's csrc/ (editable installs); None when neither has them all."""
    package = Path(__file__).resolve().parents[1]
    layouts = [
        lambda rel: package / _src.PACKAGED_CSRC_DIR / rel[len("csrc/"):],  # installed wheel
        lambda rel: package.parent / rel,                                    # source checkout
    ]
    for where in layouts:
        sources = [where(rel) for rel in _src.CUDA_SOURCES]
        headers = [where(rel) for rel in _src.CUDA_HEADERS]
        if all(p.is_file() for p in sources + headers):
            return {"sources": sources, "headers": headers}
    return None


def jit_problem() -> Optional[str]:
    """None when the CUDA ops can be compiled here on first use, else why not."""
    if os.environ.get("GPT2FAST_NO_CUDA_JIT") == "1":
        return "compiling on first use is turned off (GPT2FAST_NO_CUDA_JIT=1)"
    try:
        import torch
    except Exception as e:
        return f"torch is not importable ({type(e).__name__}: {e})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)"
    try:
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    except Exception as e:
        return f"the CUDA driver cannot be queried ({type(e).__name__}: {e})"
    nvcc = nvcc_path()
    torch_major = torch.version.cuda.split(".")[0]
    if nvcc is None:
        return f"nvcc is not found (install the CUDA {torch_major}.x toolkit, or set CUDA_HOME)"
    release = nvcc_release(nvcc)
    if release is not None and release.split(".")[0] != torch_major:
        return (f"nvcc {nvcc} is CUDA {release} but torch was built with CUDA {torch.version.cuda}; "
                f"point CUDA_HOME at a CUDA {torch_major}.x toolkit")
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
    except Exception:
        return "ninja is not installed (pip install ninja), and torch compiles extensions with it"
    if source_files() is None:
        return "the CUDA sources are not in this installation (neither gpt2fast/_csrc nor csrc/ next to it)"
    return None


def _compile(verbose: bool):
    files = source_files()
    try:
        from torch.utils.cpp_extension import load

        print("gpt2fast: compiling CUDA ops (first use, cached)...", flush=True)
        module = load(
            name=JIT_NAME,
            sources=[str(p) for p in files["sources"]],
            extra_cflags=list(_src.CUDA_CXX_FLAGS),
            extra_cuda_cflags=list(_src.CUDA_NVCC_FLAGS),
            verbose=verbose,
        )
        return module, None
    except Exception as e:  # a compile error, a missing compiler, a full disk: report it, do not raise
        msg = str(e).strip().splitlines()
        return None, f"compiling on first use failed: {type(e).__name__}: {msg[-1] if msg else ''}"


def _reset_for_tests() -> None:
    global _status
    with _lock:
        _status = None
