"""Timing GPU kernels for the benchmarks: CUDA events, L2 flushed between repeats, figures against the GPU's peak.

    ms = time_cuda(lambda: op(x), warmup=10, iters=50)        # median milliseconds per call
    report(benchmark, "ours", ms, bytes=4 * x.nbytes)         # GB/s and share of peak into extra_info

Wall-clock timing of asynchronous launches measures the CPU, not the GPU; here every repeat sits between two
CUDA events, and a 256 MB buffer is overwritten before each so no repeat finds its inputs in L2 (H100's L2 is
50 MB) and memory-bound kernels are measured at DRAM speed, as in training.
"""
from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass
from typing import Callable, Optional

import torch

L2_FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Peak:
    name: str
    gb_per_s: float  # DRAM bandwidth
    tflop_per_s: float  # dense tensor-core bf16 (fp16 on V100)


# Matched in order against torch.cuda.get_device_name(): the specific variants before the generic name.
PEAKS = (
    ("H200", Peak("H200", 4800, 989)),
    ("H100 PCIe", Peak("H100 PCIe", 2000, 756)),
    ("H100 NVL", Peak("H100 NVL", 3900, 835)),
    ("H100", Peak("H100 SXM", 3350, 989)),
    ("A100-SXM4-40GB", Peak("A100 40GB", 1555, 312)),
    ("A100-PCIE-40GB", Peak("A100 40GB", 1555, 312)),
    ("A100", Peak("A100 80GB", 2039, 312)),
    ("V100", Peak("V100", 900, 125)),
)


@functools.lru_cache(maxsize=None)
def gpu_peak(device_index: int = 0) -> Optional[Peak]:
    """The peak figures of this GPU, or None for one not in ``PEAKS``."""
    name = torch.cuda.get_device_name(device_index)
    return next((peak for key, peak in PEAKS if key.lower() in name.lower()), None)


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


def report(benchmark, name: str, ms: float, bytes: Optional[int] = None, flops: Optional[float] = None,
           copy_bandwidth: Optional[float] = None) -> dict:
    """Put ``ms`` and the rates it implies into ``benchmark.extra_info`` (if a benchmark fixture is given),
    print them on one line, and return them.

    bytes: DRAM bytes the call must move (GB/s and share of the GPU's peak bandwidth, and of
    ``copy_bandwidth`` when given); flops: floating-point operations (TFLOP/s and share of bf16 peak)."""
    figures = {"ms": round(ms, 4)}
    peak = gpu_peak(torch.cuda.current_device()) if torch.cuda.is_available() else None
    if bytes is not None:
        gb_s = bytes / ms / 1e6
        figures["GB/s"] = round(gb_s, 1)
        if peak is not None:
            figures["share_of_peak_bandwidth"] = round(gb_s / peak.gb_per_s, 3)
        if copy_bandwidth:
            figures["copy_GB/s"] = round(copy_bandwidth, 1)
            figures["share_of_copy_bandwidth"] = round(gb_s / copy_bandwidth, 3)
    if flops is not None:
        tflop_s = flops / ms / 1e9
        figures["TFLOP/s"] = round(tflop_s, 2)
        if peak is not None:
            figures["share_of_peak_tflops"] = round(tflop_s / peak.tflop_per_s, 3)
    if peak is not None:
        figures["gpu"] = peak.name
    if benchmark is not None:
        benchmark.extra_info.update({"impl": name, **figures})
    print(f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    return figures


def run_benchmark(benchmark, fn: Callable[[], object], rounds: int = 20) -> None:
    """Let pytest-benchmark time ``fn`` too (for its table), synchronising so each round is the GPU's time
    plus the launch, not just the launch."""
    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, setup=torch.cuda.synchronize, rounds=rounds, warmup_rounds=3, iterations=1)
