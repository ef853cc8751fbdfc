"""Choosing a backend for an op: "auto" | "cuda" | "triton" | "torch".

"auto" takes the fastest fused path that can run on the inputs -- the CUDA C++ kernel (gpt2fast._cuda_ops) or
the Triton one, whichever was measured faster for that op on this GPU (``PREFERRED``) -- and falls back to the
plain-PyTorch reference, with a one-time warning, when neither can run (CPU tensors, a dtype or shape the
kernels do not cover, no Triton and no CUDA ops). Asking for "cuda" or "triton" explicitly where it cannot run
is an error that says why.

The CUDA ops are only looked for (and, on a GPU machine without a prebuilt module, compiled on first use) when
"auto" would pick them or "cuda" is asked for: a Triton-first op never triggers a compile.

On machines without a GPU, Triton kernels can still run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported); the tests use it so the kernels' logic is checked
on every commit.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

from gpt2fast import backend_prefs

BACKENDS = ("auto", "cuda", "triton", "torch")
_warned: set = set()

# Which fused path "auto" tries first, per op and GPU architecture ("sm_90"), from the benchmarks' side-by-side
# timings (benchmarks/test_bench_ops_*.py, recorded in benchmarks/RESULTS.md). An op or GPU with no measurement
# tries Triton first (autotuned per shape), then CUDA. In order, the first that has an answer wins:
# GPT2FAST_PREFER_BACKEND=cuda|triton; this machine's own measurement (MEASURED: written by
# `python -m gpt2fast.bench prefer results.json`, read once at import; see gpt2fast/backend_prefs.py); the table
# shipped here. PREFERRED is empty so far: no side-by-side GPU run of the two paths has been recorded yet.
PREFERRED: Dict[Tuple[str, str], str] = {}
MEASURED: Dict[Tuple[str, str], str] = {
    (op, arch): backend for arch, ops in backend_prefs.load().items() for op, backend in ops.items()}
NO_CUDA_KERNEL = "there is no CUDA C++ kernel for this op"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe_triton() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"Triton is not importable ({type(e).__name__}: {e}); pip install triton"
    return None


_TRITON_IMPORT_ERROR = _probe_triton()  # once, at import: a plain constant is also free under torch.compile


def triton_import_error() -> Optional[str]:
    """None when Triton imports, else why not."""
    return _TRITON_IMPORT_ERROR


def why_not_triton(tensors: Iterable[torch.Tensor], dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16),
                   extra: Optional[str] = None) -> Optional[str]:
    """None when the Triton path can run on these tensors, else the reason it cannot."""
    err = triton_import_error()
    if err:
        return err
    tensors = list(tensors)
    for t in tensors:
        if t.device.type == "cpu" and not triton_interpreting():
            return "the tensors are on the CPU (Triton kernels need a GPU, or TRITON_INTERPRET=1 for testing)"
        if t.device.type not in ("cpu", "cuda"):
            return f"tensors on {t.device.type} are not supported"
    return _tensors_problem(tensors, dtypes) or extra


def _tensors_problem(tensors: list, dtypes: tuple) -> Optional[str]:
    """What both fused paths refuse alike: an unsupported dtype, tensors on several devices, bf16 before sm_80."""
    for t in tensors:
        if t.is_floating_point() and t.dtype not in dtypes:
            return f"dtype {t.dtype} is not supported (supported: {', '.join(str(d) for d in dtypes)})"
    if tensors and any(t.device != tensors[0].device for t in tensors):
        return "the tensors are on different devices"
    if any(t.dtype == torch.bfloat16 for t in tensors) and tensors[0].is_cuda \
            and torch.cuda.get_device_capability(tensors[0].device)[0] < 8:
        return "bf16 needs a GPU of compute capability 8.0 or newer"
    return None


def why_not_cuda(tensors: Iterable[torch.Tensor], dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16),
                 extra: Optional[str] = None) -> Optional[str]:
    """None when the CUDA C++ kernels can run on these tensors, else the reason they cannot. Cheap checks
    first; the extension itself is loaded last (which compiles it on first use where that is possible)."""
    tensors = list(tensors)
    if not tensors or not all(t.is_cuda for t in tensors):
        return "the tensors are not on a CUDA GPU (the CUDA C++ kernels need one)"
    problem = _tensors_problem(tensors, dtypes) or extra
    if problem:
        return problem
    from gpt2fast.ops import _cuda

    status = _cuda.cuda_ops_status()
    if status.module is None:
        return f"the CUDA ops are not available: {status.reason}"
    return None


def device_arch(tensors: Iterable[torch.Tensor]) -> Optional[str]:
    """"sm_90" for tensors on an H100, None for CPU tensors."""
    for t in tensors:
        if t.is_cuda:
            major, minor = torch.cuda.get_device_capability(t.device)
            return f"sm_{major}{minor}"
    return None


def preferred_order(op: str, arch: Optional[str]) -> Tuple[str, str]:
    """The order in which "auto" tries the fused paths for ``op`` on ``arch``."""
    key = (op, arch or "cpu")
    first = os.environ.get("GPT2FAST_PREFER_BACKEND") or MEASURED.get(key) or PREFERRED.get(key, "triton")
    if first not in ("cuda", "triton"):
        raise ValueError(f"GPT2FAST_PREFER_BACKEND={first!r}: set it to 'cuda' or 'triton' (or unset it)")
    return (first, "triton" if first == "cuda" else "cuda")


def choose(op: str, backend: str, reason_not_triton: Optional[str],
           cuda_check: Optional[Callable[[], Optional[str]]] = None,
           tensors: Iterable[torch.Tensor] = ()) -> str:
    """The backend to run: "cuda", "triton" or "torch".

    ``reason_not_triton``: None when Triton can run, else why not. ``cuda_check``: called (only when needed) to
    learn whether the CUDA kernel can run, returning None or the reason; None when the op has no CUDA kernel.
    ``tensors``: the inputs, for the GPU architecture the preference is looked up for."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    reasons = {"triton": lambda: reason_not_triton,
               "cuda": cuda_check if cuda_check is not None else (lambda: NO_CUDA_KERNEL)}
    if backend in ("triton", "cuda"):
        reason = reasons[backend]()
        if reason is None:
            return backend
        other = "triton" if backend == "cuda" else "cuda"
        raise RuntimeError(f"{op}: the {'Triton' if backend == 'triton' else 'CUDA C++'} backend cannot run here: "
                           f"{reason}. Use backend='auto' to take the {other} path or the PyTorch reference, "
                           f"or backend='torch'.")
    found = {}
    for candidate in preferred_order(op, device_arch(tensors)):
        found[candidate] = reasons[candidate]()
        if found[candidate] is None:
            return candidate
    because = found["triton"]
    if device_arch(tensors) is not None and found["cuda"] not in (NO_CUDA_KERNEL, because):
        because = f"{because} (and the CUDA kernel: {found['cuda']})"
    warn_once(op, because, stacklevel=4)
    return "torch"


def warn_once(op: str, because: str, stacklevel: int = 3) -> None:
    """The one-time warning of a fallback to the PyTorch reference (once per op and reason)."""
    key = (op, because)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"gpt2fast.ops.{op}: using the PyTorch reference because {because}",
                      RuntimeWarning, stacklevel=stacklevel)
