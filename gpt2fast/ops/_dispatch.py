"""Choosing a backend for an op: "auto" | "cuda" | "triton" | "torch".

"auto" on a GPU measures instead of guessing. The first time an op runs for a key (the GPU, the versions of
torch, Triton and gpt2fast, the op, the dtypes, the shape bucket), it times every path that can run there --
ours in CUDA C++ (gpt2fast._cuda_ops), ours in Triton, and the PyTorch peer (SDPA, F.layer_norm, F.gelu,
F.cross_entropy...) -- forward, plus backward when the inputs need gradients, on copies of the inputs, and
keeps the fastest. Decisions are kept on disk per machine (gpt2fast/ops/_decisions.py) and listed by
``python -m gpt2fast.ops.info``; so on any GPU, ours or not, "auto" is never slower than PyTorch's own path
beyond the noise of the measurement. ``GPT2FAST_PREFER_BACKEND=cuda|triton|torch`` overrides the decision
(the others are still tried, in the default order, where the preferred one cannot run). Inside
``torch.compile`` tracing or CUDA-graph capture nothing is timed: a decision already made is used, else
the default order (Triton, then CUDA).

Where no fused path can run (CPU tensors, a dtype or shape the kernels do not cover, no Triton and no CUDA
ops) "auto" falls back to the plain-PyTorch reference with a one-time warning. Asking for "cuda" or
"triton" explicitly where it cannot run raises ``BackendUnavailable``, which says why. On the CPU nothing is
timed: Triton runs there only under its interpreter (``TRITON_INTERPRET=1`` set before Triton is imported), a
testing aid, so "auto" takes Triton first, as the tests expect. The tests check the choosing itself with an
injected timer (``MEASURE``).

The CUDA ops are only looked for (and, on a GPU machine without a prebuilt module, compiled on first use) when
"auto" would pick or measure them or "cuda" is asked for.
"""
from __future__ import annotations

import datetime
import math
import os
import statistics
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch

from gpt2fast.ops import _common, _decisions

BACKENDS = ("auto", "cuda", "triton", "torch")
_warned: set = set()
NO_CUDA_KERNEL = "there is no CUDA C++ kernel for this op"
PREFER_ENV = "GPT2FAST_PREFER_BACKEND"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class BackendUnavailable(RuntimeError):
    """backend="cuda" or "triton" was asked for where that path cannot run; the message says why and what to ask
    for instead. A subclass of RuntimeError, what was raised before, so callers that caught that still do. The
    benchmarks skip on this type alone: any other error from a path shows as the failure it is."""


def triton_import_error() -> Optional[str]:
    """None when Triton imports, else why not (found once, at import: a plain constant, free under
    torch.compile)."""
    return _common.TRITON_IMPORT_ERROR


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
    from gpt2fast.ops import _cuda_loader

    status = _cuda_loader.cuda_ops_status()
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


def preferred_order(op: str) -> Tuple[str, ...]:
    """The order in which "auto" tries the paths when it has no measurement: GPT2FAST_PREFER_BACKEND's path
    first, then Triton (autotuned per shape), then CUDA."""
    first = os.environ.get(PREFER_ENV) or "triton"
    if first not in ("cuda", "triton", "torch"):
        raise ValueError(f"{PREFER_ENV}={first!r}: set it to 'cuda', 'triton' or 'torch' (or unset it)")
    return (first,) + tuple(b for b in ("triton", "cuda") if b != first)


# ------------------------------------------------------------------------------------------- measuring
def cuda_event_timer(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 5,
                     batch: int = 4) -> float:
    """Median milliseconds of one call of ``fn``, each repeat a batch of calls enqueued back to back between
    two CUDA events: what a call costs in a stream that is kept busy (kernel time, or the launch path where
    that is longer), as in training. The warm-up calls also trigger Triton's autotuning and compiles."""
    with torch.cuda.device(device):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(batch):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / batch)
    return statistics.median(times)


@dataclass
class Measure:
    """How "auto" times the paths: ``timer(fn, device) -> ms per call``, on tensors of ``devices``."""

    timer: Callable[[Callable[[], object], torch.device], float] = cuda_event_timer
    devices: Tuple[str, ...] = ("cuda",)


MEASURE = Measure()
_device_names: Dict[Tuple[str, Optional[int]], str] = {}
_unkept: Dict[str, dict] = {}  # decisions measured while a kept decision's path could not run


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _device_name(device: torch.device) -> str:
    key = (device.type, device.index)
    name = _device_names.get(key)
    if name is None:
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
        else:
            name = device.type
        _device_names[key] = name
    return name


def _triton_version() -> str:
    return _common.triton.__version__ if _common.triton is not None else "none"


_VERSIONS = None


def _versions() -> str:
    global _VERSIONS
    if _VERSIONS is None:
        import gpt2fast

        _VERSIONS = f"torch {torch.__version__}|triton {_triton_version()}|gpt2fast {gpt2fast.__version__}"
    return _VERSIONS


def shape_bucket(*dims: int) -> str:
    """Sizes rounded up to powers of two: shapes that land in one bucket share one decision."""
    return "x".join(str(1 << max(0, int(d) - 1).bit_length()) if d > 0 else "0" for d in dims)


def decision_key(op: str, tensors: Sequence[torch.Tensor], bucket: str) -> str:
    dtypes = "+".join(sorted({str(t.dtype).replace("torch.", "") for t in tensors if t.is_floating_point()}))
    grad = "fwd+bwd" if torch.is_grad_enabled() and any(t.requires_grad for t in tensors) else "fwd"
    return f"{_device_name(tensors[0].device)}|{_versions()}|{op}|{dtypes}|{bucket}|{grad}"


def _flat_tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat_tensors(o)]
    return []


def _timed_call(run: Callable, path: str, inputs: Sequence[torch.Tensor]) -> Callable[[], None]:
    """A call of ``path`` on detached copies of ``inputs`` (so no gradient reaches the caller's tensors), with
    the backward pass when the inputs need gradients."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    copies = [t.detach().requires_grad_(t.requires_grad) if grad else t.detach() for t in inputs]
    wrt = [c for c in copies if c.requires_grad]

    def call() -> None:
        outs = [o for o in _flat_tensors(run(path, *copies)) if o.requires_grad] if grad else run(path, *copies)
        if grad and outs:
            torch.autograd.grad(outs, wrt, grad_outputs=[torch.ones_like(o) for o in outs], allow_unused=True)

    return call


def _measure(op: str, candidates: Sequence[str], run: Callable, inputs: Sequence[torch.Tensor]) -> dict:
    times: Dict[str, float] = {}
    for path in candidates:
        try:
            times[path] = float(MEASURE.timer(_timed_call(run, path, inputs), inputs[0].device))
        except torch.cuda.OutOfMemoryError:  # one path's workspace does not fit beside the caller's tensors
            warn_once(op, f"measuring its {path} path ran out of GPU memory", stacklevel=5)
            torch.cuda.empty_cache()
    finite = {p: t for p, t in times.items() if math.isfinite(t)}
    best = min(finite, key=finite.get) if finite else "torch"
    return {"backend": best, "ms": {p: round(t, 6) for p, t in times.items()},
            "measured": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def choose(op: str, backend: str, reason_not_triton: Optional[str],
           cuda_check: Optional[Callable[[], Optional[str]]] = None,
           tensors: Iterable[torch.Tensor] = (), run: Optional[Callable] = None,
           bucket: Optional[str] = None) -> str:
    """The backend to run: "cuda", "triton" or "torch".

    ``reason_not_triton``: None when Triton can run, else why not. ``cuda_check``: called (only when needed) to
    learn whether the CUDA kernel can run, returning None or the reason; None when the op has no CUDA kernel.
    ``tensors``: the inputs (the first one's device is where the op runs). ``run(path, *tensors)``: the op
    along ``path`` on those tensors, which "auto" times to decide, with ``bucket`` (see ``shape_bucket``)
    naming the shapes the decision holds for; without ``run`` nothing is timed."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    known: Dict[str, Optional[str]] = {}

    def reason(path: str) -> Optional[str]:
        if path == "torch":
            return None
        if path not in known:
            if path == "triton":
                known[path] = reason_not_triton
            else:
                known[path] = cuda_check() if cuda_check is not None else NO_CUDA_KERNEL
        return known[path]

    if backend in ("triton", "cuda"):
        why = reason(backend)
        if why is None:
            return backend
        other = "triton" if backend == "cuda" else "cuda"
        name = "Triton" if backend == "triton" else "CUDA C++"
        raise BackendUnavailable(f"{op}: the {name} backend cannot run here: {why}. Use backend='auto' to take "
                                 f"the {other} path or the PyTorch reference, or backend='torch'.")
    order = preferred_order(op)
    if order[0] == "torch":
        return "torch"
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    device = tensors[0].device if tensors else None
    key = None
    if run is not None and device is not None and device.type in MEASURE.devices and PREFER_ENV not in os.environ:
        key = decision_key(op, tensors, bucket if bucket is not None else shape_bucket(*tensors[0].shape))
        frozen = _is_compiling() or _is_capturing(device)  # nothing may be timed (or read from disk) now
        decided = _decisions.peek(key) if frozen else _decisions.lookup(key)
        if decided is not None and reason(decided["backend"]) is not None:
            # Its path cannot run in this process (the CUDA ops failed to build, say): the paths that can are
            # compared here for this process only, and the kept decision stands for when its path is back.
            decided = _unkept.get(key)
        if decided is not None and reason(decided["backend"]) is None:
            return decided["backend"]
        if not frozen:
            fused = [p for p in ("cuda", "triton") if reason(p) is None]
            if fused:
                entry = _measure(op, fused + ["torch"], run, tensors)
                if _decisions.lookup(key) is None:
                    _decisions.record(key, entry)
                else:
                    _unkept[key] = entry
                return entry["backend"]
    for candidate in order:
        if reason(candidate) is None:
            return candidate
    because = reason("triton")
    if device_arch(tensors) is not None and reason("cuda") not in (NO_CUDA_KERNEL, because):
        because = f"{because} (and the CUDA kernel: {reason('cuda')})"
    warn_once(op, because, stacklevel=4)
    return "torch"


def warn_once(op: str, because: str, stacklevel: int = 3) -> None:
    """The one-time warning of a fallback to the PyTorch reference (once per op and reason)."""
    key = (op, because)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"gpt2fast.ops.{op}: using the PyTorch reference because {because}",
                      RuntimeWarning, stacklevel=stacklevel)
