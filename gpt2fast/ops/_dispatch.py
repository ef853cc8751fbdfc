"""Choosing a backend for an op: "auto" | "triton" | "torch" (and "cuda" once the CUDA C++ ops land).

"auto" takes the fastest path that can run on the inputs and falls back to the plain-PyTorch reference,
with a one-time warning, when it cannot (CPU tensors, a dtype or shape the kernel does not cover, no
Triton). Asking for "triton" explicitly where it cannot run is an error that says why.

On machines without a GPU, Triton kernels can still run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported); the tests use it so the kernels' logic is checked
on every commit.
"""
from __future__ import annotations

import os
import warnings
from typing import Iterable, Optional

import torch

BACKENDS = ("auto", "triton", "torch")
_warned: set = set()


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
        if t.is_floating_point() and t.dtype not in dtypes:
            return f"dtype {t.dtype} is not supported (supported: {', '.join(str(d) for d in dtypes)})"
    if tensors and any(t.device != tensors[0].device for t in tensors):
        return "the tensors are on different devices"
    if any(t.is_cuda for t in tensors) and not _bf16_ok(tensors):
        return "bf16 needs a GPU of compute capability 8.0 or newer"
    return extra


def _bf16_ok(tensors) -> bool:
    if not any(t.dtype == torch.bfloat16 for t in tensors):
        return True
    major, _ = torch.cuda.get_device_capability(tensors[0].device)
    return major >= 8


def choose(op: str, backend: str, reason_not_triton: Optional[str]) -> str:
    """The backend to run: "triton" or "torch". ``reason_not_triton`` is None when Triton can run."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    if reason_not_triton is None:
        return "triton"
    if backend == "triton":
        raise RuntimeError(f"{op}: the Triton backend cannot run here: {reason_not_triton}. "
                           f"Use backend='auto' to fall back to the PyTorch reference, or backend='torch'.")
    key = (op, reason_not_triton)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"gpt2fast.ops.{op}: using the PyTorch reference because {reason_not_triton}",
                      RuntimeWarning, stacklevel=3)
    return "torch"
