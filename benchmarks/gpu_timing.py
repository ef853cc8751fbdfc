"""Timing GPU kernels for the benchmarks: CUDA events, L2 flushed between repeats, figures against peaks.

    ms = time_cuda(lambda: op(x), warmup=10, iters=50)        # median milliseconds per call
    figures = report(benchmark, "ours", ms, bytes=4 * x.nbytes)  # GB/s and shares of peak into extra_info
    record_figures("LayerNorm fwd", "ours", "ours (triton)", figures, suite="norm_gelu")  # into the summary

Wall-clock timing of asynchronous launches measures the CPU, not the GPU; here every repeat sits between two
CUDA events, and a 256 MB buffer is overwritten before each so no repeat finds its inputs in L2 (H100's L2 is
50 MB) and memory-bound kernels are measured at DRAM speed, as in training.

Every figure is set against five ceilings (``gpt2fast.hardware.peak_shares``): the detected GPU's datasheet
peak, the V100, A100 and H100 peaks (so runs on different GPUs and the papers' figures line up), and a
ceiling measured on the spot once per session (``measured_ceilings``): a bf16 matmul of 8192^3 for TFLOP/s,
a 1 GiB device-to-device copy for GB/s.
"""
from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import pytest
import torch

from bench_results import SESSION, Figure, record
from gpt2fast.hardware import GpuPeak, detect_gpu, peak_shares

L2_FLUSH_BYTES = 256 * 2**20
CEILING_MATMUL_N = 8192  # bf16 (N x N) @ (N x N): large enough to run at the tensor cores' sustained rate
CEILING_COPY_BYTES = 2**30  # copied device to device: far beyond any L2, so DRAM speed
OURS_BACKENDS = ("triton", "cuda")  # our fast paths, each measured beside the same peers


@functools.lru_cache(maxsize=None)
def gpu_peak(device_index: int = 0) -> Optional[GpuPeak]:
    """The peak figures of this GPU (``gpt2fast.hardware``), or None for one not in its table."""
    name = torch.cuda.get_device_name(device_index)
    peak = detect_gpu(name)
    SESSION["gpu"] = name
    SESSION["gpu_peak"] = peak.name if peak else "not in gpt2fast.hardware's table: no share of peak"
    SESSION["gpu_timing"] = "GPU: median of CUDA-event-timed calls, L2 flushed in between"
    return peak


@functools.lru_cache(maxsize=None)
def _flush_buffer(device_index: int) -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=f"cuda:{device_index}")


def time_cuda(fn: Callable[[], object], warmup: int = 10, iters: int = 50, flush_l2: bool = True) -> float:
    """Median milliseconds of one call of ``fn`` on the current CUDA device, each repeat from a cold L2."""
    device = torch.cuda.current_device()
    flush = _flush_buffer(device) if flush_l2 else None
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        if flush is not None:
            flush.zero_()  # outside the events: evicts fn's inputs from L2 without being timed
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


@functools.lru_cache(maxsize=None)
def copy_gb_per_s(nbytes: int) -> float:
    """Measured device-to-device copy bandwidth (GB/s of bytes read + written) for ``nbytes`` moved in all:
    the practical ceiling for a memory-bound kernel that moves as many bytes."""
    src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device="cuda")
    ms = time_cuda(lambda: src.clone())
    return 2 * src.numel() / ms / 1e6


@dataclass(frozen=True)
class Ceilings:
    matmul_tflops: Optional[float]  # bf16 CEILING_MATMUL_N^3 matmul, TFLOP/s; None if it could not run
    copy_gb_per_s: Optional[float]  # CEILING_COPY_BYTES copy, GB/s of bytes read + written


def _measure_ceiling(what: str, fn: Callable[[], float]) -> Optional[float]:
    try:
        return fn()
    except RuntimeError as e:  # out of memory on a small GPU, say: go on without that ceiling
        print(f"\nmeasured ceiling {what!r} not available: {type(e).__name__}: {e}")
        return None
    finally:
        torch.cuda.empty_cache()  # hand the buffers back before the benchmarks measure their own memory


def _matmul_tflops(n: int = CEILING_MATMUL_N) -> float:
    g = torch.Generator(device="cuda").manual_seed(0)
    a, b = (torch.randn(n, n, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)
    ms = time_cuda(lambda: torch.mm(a, b, out=out), warmup=5, iters=20, flush_l2=False)
    return 2 * n**3 / ms / 1e9


def _copy_gb_per_s(nbytes: int = CEILING_COPY_BYTES) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), warmup=3, iters=20, flush_l2=False)
    return 2 * nbytes / ms / 1e6


@functools.lru_cache(maxsize=None)
def measured_ceilings(device_index: int = 0) -> Ceilings:
    """The TFLOP/s of a large bf16 matmul and the GB/s of a large copy on this GPU, measured once per session:
    what a kernel can reach in practice, beside the datasheet peak."""
    with torch.cuda.device(device_index):
        ceilings = Ceilings(_measure_ceiling("bf16 matmul", _matmul_tflops),
                            _measure_ceiling("device copy", _copy_gb_per_s))
    if ceilings.matmul_tflops is not None:
        SESSION["measured_ceilings"][f"bf16 matmul {CEILING_MATMUL_N}^3"] = f"{ceilings.matmul_tflops:.1f} TFLOP/s"
    if ceilings.copy_gb_per_s is not None:
        SESSION["measured_ceilings"][f"device copy {CEILING_COPY_BYTES / 2**30:g} GiB"] = \
            f"{ceilings.copy_gb_per_s:.0f} GB/s"
    return ceilings


def report(benchmark, name: str, ms: float, bytes: Optional[int] = None, flops: Optional[float] = None,
           copy_bandwidth: Optional[float] = None, precision: str = "bf16") -> dict:
    """Put ``ms`` and the rates it implies into ``benchmark.extra_info`` (if a benchmark fixture is given),
    print them on one line, and return them.

    flops: floating-point operations (TFLOP/s, set against the ``precision`` peaks and the measured matmul);
    else bytes: DRAM bytes the call must move (GB/s, set against peak bandwidths and the measured copy; and
    against ``copy_bandwidth``, a copy of the same size, when given). ``shares`` holds the shares of peak:
    "detected" (this GPU), "measured", "V100", "A100", "H100" (see ``gpt2fast.hardware.peak_shares``)."""
    figures: dict = {"ms": round(ms, 4)}
    device = torch.cuda.current_device()
    peak = gpu_peak(device)
    ceilings = measured_ceilings(device)
    if bytes is not None:
        gb_s = bytes / ms / 1e6
        figures["GB/s"] = round(gb_s, 1)
        if copy_bandwidth:
            figures["copy_GB/s"] = round(copy_bandwidth, 1)
            figures["share_of_copy_bandwidth"] = round(gb_s / copy_bandwidth, 3)
        if flops is None:
            figures["share_basis"] = "GB/s"
            figures["shares"] = peak_shares(gb_s=gb_s, detected=peak, measured=ceilings.copy_gb_per_s)
    if flops is not None:
        tflop_s = flops / ms / 1e9
        figures["TFLOP/s"] = round(tflop_s, 2)
        figures["share_basis"] = f"TFLOP/s {precision}"
        measured = ceilings.matmul_tflops if precision == "bf16" else None
        figures["shares"] = peak_shares(tflop_s=tflop_s, precision=precision, detected=peak, measured=measured)
    if peak is not None:
        figures["gpu"] = peak.name
    if benchmark is not None:
        benchmark.extra_info.update({"impl": name, **figures})
    print(f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in figures.items() if k != "shares")
          + _shares_text(figures.get("shares"), peak))
    return figures


def _shares_text(shares: Optional[Dict[str, float]], peak: Optional[GpuPeak]) -> str:
    if not shares:
        return ""
    names = {"detected": f"of this GPU's peak ({peak.name if peak else '?'})", "measured": "of measured ceiling"}
    return "; " + ", ".join(f"{v:.0%} {names.get(k, f'of {k} peak')}" for k, v in shares.items())


def record_figures(group: str, role: str, impl: str, figures: dict, *, suite: str, goal: Optional[float] = None,
                   goal_peer: Optional[str] = None, value: Optional[float] = None, unit: str = "ms",
                   higher_is_better: bool = False) -> Figure:
    """Record what ``report`` returned as one figure of the end-of-session summary (``bench_results.record``):
    by default the time per call (ms, lower is better) with its TFLOP/s or GB/s and shares of peak beside
    it; ``value``/``unit``/``higher_is_better`` record another measure instead (tokens/s for training)."""
    rates = {unit_: figures[unit_] for unit_ in ("TFLOP/s", "GB/s") if unit_ in figures}
    figure = Figure(impl, figures["ms"] if value is None else value, unit, higher_is_better, rates=rates,
                    shares=dict(figures.get("shares") or {}), share_basis=figures.get("share_basis"))
    record(group, role, figure, goal, suite=suite, goal_peer=goal_peer)
    return figure


_ONCE: Dict[object, dict] = {}


def measure_once(key, measure: Callable[[], dict]) -> dict:
    """``measure()`` the first time ``key`` is asked for, the same figures after: a peer is timed once for
    ours (triton) and ours (cuda) both."""
    if key not in _ONCE:
        _ONCE[key] = measure()
    return _ONCE[key]


def require_backend(backend: str) -> None:
    """Skip the calling test when our ``backend`` cannot run on this machine (the CUDA C++ ops neither built
    at install time nor compiled on first use), saying why."""
    if backend != "cuda":
        return
    from gpt2fast.ops._cuda import cuda_ops_status, load_cuda_ops

    if load_cuda_ops() is None:
        pytest.skip(f"ours (cuda): the CUDA C++ ops are not available: {cuda_ops_status().reason}")


def first_call(backend: str, fn: Callable[[], object]):
    """Call ``fn`` (our op on ``backend``) once and return its result; for backend="cuda", an op the CUDA
    path does not cover (yet) raises, and the test is skipped with that message instead of failing."""
    try:
        return fn()
    except (RuntimeError, ValueError, NotImplementedError) as e:
        if backend != "cuda":
            raise
        pytest.skip(f"ours (cuda): backend='cuda' is not available for this op: {type(e).__name__}: {e}")


def run_benchmark(benchmark, fn: Callable[[], object], rounds: int = 20) -> None:
    """Let pytest-benchmark time ``fn`` too (for its table), synchronising so each round is the GPU's time
    plus the launch, not just the launch."""
    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, setup=torch.cuda.synchronize, rounds=rounds, warmup_rounds=3, iterations=1)
