"""What the op modules share, written once: Triton's import, the launch helpers of the Triton paths, and the way
the CUDA paths reach the extension module and register their ``torch.ops.gpt2fast.*`` operators."""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: Optional[str] = None
except Exception as e:  # ImportError, or a broken install: the references (and the CUDA paths) still work
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = f"Triton is not importable ({type(e).__name__}: {e}); pip install triton"

_MODULE_OVERRIDE = None  # tests: a plain-PyTorch stand-in for the extension module (tests/cuda_standin.py)


# ------------------------------------------------------------------------------------------- Triton launches
def device_guard(t: torch.Tensor):
    """Triton launches on the current device: make it t's. Nothing to do for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def programs_target(device: torch.device) -> int:
    """How many programs a grid-strided kernel should run: a few per SM keeps every SM busy; under the
    interpreter the programs run one after another, so fewer, bigger ones are faster."""
    if device.type != "cuda":
        return 4
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# ------------------------------------------------------------------------------------------- CUDA custom ops
def cuda_module():
    """The CUDA ops extension module (gpt2fast._cuda_ops), found or compiled on first use by
    gpt2fast.ops._cuda_loader; ``BackendUnavailable`` with the reason when it cannot be had here."""
    if _MODULE_OVERRIDE is not None:
        return _MODULE_OVERRIDE
    from gpt2fast.ops._cuda_loader import cuda_ops_status
    from gpt2fast.ops._dispatch import BackendUnavailable

    status = cuda_ops_status()
    if status.module is None:
        raise BackendUnavailable(f"gpt2fast: the CUDA ops are not available: {status.reason}")
    return status.module


def cuda_op(name: str, mutates_args=()):
    """Decorator registering a function over ``cuda_module()`` as the custom operator ``gpt2fast::<name>``.

    An operator is one opaque node to autograd and to torch.compile: a model on backend="cuda" traces without
    the graph break a direct pybind11 call would cause. Each op module registers its operators' fake (shapes,
    dtypes and strides as the binding makes them, for tracing) and, for the differentiable ones, the backward."""
    return torch.library.custom_op(f"gpt2fast::{name}", mutates_args=mutates_args, device_types="cuda")
