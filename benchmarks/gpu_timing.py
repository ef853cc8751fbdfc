"""Timing GPU kernels for the benchmarks: batches of calls between CUDA events, L2 flushed before each call,
figures against peaks.

    ms = time_cuda(lambda: op(x), warmup=10, iters=50)        # median milliseconds per call
    figures = report(benchmark, "ours", ms, bytes=4 * x.nbytes)  # GB/s and shares of peak into extra_info
    record_figures("LayerNorm fwd", "ours", "ours (triton)", figures, suite="layer_norm")  # into the summary

Wall-clock timing of asynchronous launches measures the CPU, not the GPU, and so does a pair of CUDA events
around one call whenever the call's Python path (argument checks, dispatch, autograd) takes longer than its
kernels: the GPU waits for the launch between the events. So calls are timed in batches (``time_calls``):

* a few calls, each between two events (``time_per_call``), give a first, host-inflated estimate per call;
  it sets k, the calls in a batch: enough for ``MIN_BATCH_MS`` at that estimate, at most ``MAX_BATCH`` (the
  launches of a batch stay well inside what a stream queues), 1 for a call that long already (timed as
  before: beside a millisecond, the host's launch latency is small);
* each repeat queues a GPU-side spin (``torch.cuda._sleep``) sized from the host's enqueue time, then the
  start event, the k calls and the end event, so the host has queued the whole batch before the GPU reaches
  it and the calls run back to back: the batch holds kernel time only. This is checked (the start event
  must still be pending once the host is done); a repeat that fails the check is redone behind a spin twice
  as long, up to ``SPIN_TRIES`` times, then kept and counted in ``Timing.host_bound`` (a call that
  synchronises, or launches more than a stream queues, cannot be got ahead of; the later repeats of such a
  call get one try each);
* the result is the median over the repeats of batch time / k.

With ``flush_l2`` every call still starts from a cold L2: a 256 MB buffer is overwritten before each call of
a batch (H100's L2 is 50 MB), the batch's k - 1 flushes are timed alone the same way, and their median is
taken off each batch, so memory-bound kernels are measured at DRAM speed, as in training; the figure then
carries the run-to-run spread of the flushes too. Without it calls are timed back to back from a warm L2.

Every figure is set against five ceilings (``gpt2fast.hardware.peak_shares``): the detected GPU's datasheet
peak, the V100, A100 and H100 peaks (so runs on different GPUs and the papers' figures line up), and a
ceiling measured on the spot once per session (``measured_ceilings``): a bf16 matmul of 8192^3 for TFLOP/s,
a 1 GiB device-to-device copy for GB/s.

A path of ours that cannot run here is skipped with the reason (``require_backend``, ``first_call``), on
``gpt2fast.ops.BackendUnavailable`` alone: any other exception from a path is a failure and shows as one.
"""
from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import pytest
import torch
from bench_results import SESSION, Figure, record

from gpt2fast.hardware import GpuPeak, detect_gpu, peak_shares
from gpt2fast.ops import BackendUnavailable

L2_FLUSH_BYTES = 256 * 2**20
CEILING_MATMUL_N = 8192  # bf16 (N x N) @ (N x N): large enough to run at the tensor cores' sustained rate
CEILING_COPY_BYTES = 2**30  # copied device to device: far beyond any L2, so DRAM speed
OURS_BACKENDS = ("triton", "cuda")  # our fast paths, each measured beside the same peers
MIN_BATCH_MS = 1.0  # a timed batch lasts at least this long: the events' few microseconds are < 1% of it
MAX_BATCH = 32  # calls per batch at most: with their flushes a few hundred launches, inside a stream's queue
ESTIMATE_CALLS = 3  # calls timed one by one first, to choose the batch size
SPIN_MARGIN = 2.0  # the spin before a batch lasts this many times the host's time to enqueue the batch
SPIN_MIN_MS = 0.05  # plus this
SPIN_TRIES = 3  # a batch the host could not queue before the GPU reached it is redone this often in all
SPIN_CALIBRATION_CYCLES = 10_000_000  # torch.cuda._sleep cycles timed once per device (some milliseconds)


@functools.cache
def needs_gpu(what: str):
    """The mark every GPU benchmark module sets: a mark, not a module-level skip, so that without a GPU the
    benchmarks are still collected (tools/gpu_session.sh --dry-run lists them) and each is skipped with why."""
    return pytest.mark.skipif(not torch.cuda.is_available(),
                              reason=f"GPU benchmark: CUDA is not available ({what} timed on a GPU)")


def gpu_peak(device_index: int = 0) -> Optional[GpuPeak]:
    """The peak figures of this GPU (``gpt2fast.hardware``), or None for one not in its table."""
    name = torch.cuda.get_device_name(device_index)
    peak = detect_gpu(name)
    SESSION["gpu"] = name
    SESSION["gpu_peak"] = peak.name if peak else "not in gpt2fast.hardware's table: no share of peak"
    SESSION["gpu_timing"] = ("GPU: median per call of CUDA-event-timed batches queued behind a GPU spin (no host "
                             "time in them), L2 flushed before every call and the flushes' time taken off")
    return peak


@functools.cache
def _flush_buffer(device_index: int) -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=f"cuda:{device_index}")


def batch_size(ms_per_call: float, min_batch_ms: float = MIN_BATCH_MS, max_batch: int = MAX_BATCH) -> int:
    """Calls per timed batch for a call of about ``ms_per_call``: enough for ``min_batch_ms``, at most
    ``max_batch``, 1 for a call that long already."""
    if ms_per_call <= 0:
        return max_batch
    return max(1, min(max_batch, math.ceil(min_batch_ms / ms_per_call)))


def spin_ms(host_ms_per_call: float, calls: int, margin: float = SPIN_MARGIN, floor: float = SPIN_MIN_MS) -> float:
    """How long the GPU spins before a batch of ``calls`` calls, each ``host_ms_per_call`` to enqueue: long
    enough for the host to queue the whole batch first."""
    return floor + margin * calls * host_ms_per_call


def per_call_ms(batch_ms: Sequence[float], calls: int, overhead_ms: float = 0.0) -> float:
    """Median milliseconds per call over timed batches of ``calls`` calls each, ``overhead_ms`` (the
    batch's own flushes, timed alone) taken off every batch first."""
    return statistics.median((ms - overhead_ms) / calls for ms in batch_ms)


@dataclass(frozen=True)
class Timing:
    ms: float  # per call: the median over the batches of (batch - its flushes) / calls_per_batch
    calls_per_batch: int
    batches: int
    flush_ms: float  # one flush, timed alone and taken off the batches; 0 where no flush ran inside a batch
    host_bound: int  # batches the host could not queue before the GPU reached them: host time is in those


def time_per_call(stream, fn: Callable[[], object], flush: Optional[Callable[[], object]] = None,
                  calls: int = ESTIMATE_CALLS) -> Tuple[float, float]:
    """``calls`` calls, each alone between two events (after a ``flush``): the median milliseconds of one,
    host launch time included wherever the host is slower than the kernels; and the median host
    milliseconds to enqueue a flush and a call. The first estimate ``time_calls`` sizes its batches by."""
    gpu, host = [], []
    for _ in range(calls):
        stream.synchronize()
        t0 = stream.clock()
        if flush is not None:
            flush()
        start = stream.record()
        fn()
        end = stream.record()
        host.append((stream.clock() - t0) * 1e3)
        stream.synchronize()
        gpu.append(stream.elapsed_ms(start, end))
    return statistics.median(gpu), statistics.median(host)


def time_batches(stream, fn: Callable[[], object], flush: Optional[Callable[[], object]], calls: int,
                 repeats: int, host_ms_per_call: float, tries: int = SPIN_TRIES) -> Tuple[list, int]:
    """``repeats`` batches, each: a spin, then (``flush``, start event, ``fn``) and (``flush``, ``fn``) until
    there are ``calls`` calls, then the end event. Returns the batches' milliseconds (start to end: ``calls``
    calls and ``calls`` - 1 flushes) and how many were host-bound (the GPU reached the start event before
    the host had queued the batch, in each of ``tries`` tries, every one behind a spin twice as long; after
    one such batch the rest get one try each: the call cannot be got ahead of)."""
    times, host_bound = [], 0
    for _ in range(repeats):
        spin = spin_ms(host_ms_per_call, calls)
        for _ in range(tries):
            stream.synchronize()
            stream.spin(spin)
            t0 = stream.clock()
            if flush is not None:
                flush()
            start = stream.record()
            for i in range(calls):
                if flush is not None and i:
                    flush()
                fn()
            end = stream.record()
            host_ms_per_call = (stream.clock() - t0) * 1e3 / calls
            ahead = not stream.reached(start)
            if ahead:
                break
            spin = max(2 * spin, spin_ms(host_ms_per_call, calls))
        if not ahead:
            host_bound += 1
            tries = 1
        stream.synchronize()
        times.append(stream.elapsed_ms(start, end))
    return times, host_bound


def time_calls(stream, fn: Callable[[], object], flush: Optional[Callable[[], object]] = None, warmup: int = 10,
               iters: int = 50, min_batch_ms: float = MIN_BATCH_MS, max_batch: int = MAX_BATCH) -> Timing:
    """Kernel milliseconds per call of ``fn`` in batches (module docstring): ``warmup`` calls, a first
    estimate, then ``iters`` batches (and, with ``flush``, ``iters`` batches of the flushes alone).

    ``stream`` is what is timed on: ``record()`` queues an event and returns it, ``elapsed_ms(start, end)``,
    ``reached(event)`` (the GPU has passed it), ``spin(ms)`` queues a GPU-side wait, ``synchronize()`` waits
    for the GPU, ``clock()`` is the host's clock in seconds (``CudaStream`` on a GPU; a simulated one in the
    tests)."""
    for _ in range(warmup):
        fn()
    estimate, host_ms = time_per_call(stream, fn, flush)
    calls = batch_size(estimate, min_batch_ms, max_batch)
    tries = SPIN_TRIES if calls > 1 else 1  # a call of min_batch_ms or more: host latency is small beside it
    batches, host_bound = time_batches(stream, fn, flush, calls, iters, host_ms, tries)
    flushes_ms = 0.0
    if flush is not None and calls > 1:
        flushes, flush_host_bound = time_batches(stream, flush, None, calls - 1, iters, host_ms, tries)
        flushes_ms = statistics.median(flushes)
        host_bound += flush_host_bound
    return Timing(per_call_ms(batches, calls, flushes_ms), calls, iters,
                  flushes_ms / (calls - 1) if calls > 1 else 0.0, host_bound)


@functools.cache
def _sleep_cycles_per_ms(device_index: int) -> float:
    """GPU clock cycles ``torch.cuda._sleep`` spins per millisecond on this device (timed once)."""
    with torch.cuda.device(device_index):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SPIN_CALIBRATION_CYCLES)  # the first launch, not timed
        start.record()
        torch.cuda._sleep(SPIN_CALIBRATION_CYCLES)
        end.record()
        torch.cuda.synchronize()
        return SPIN_CALIBRATION_CYCLES / start.elapsed_time(end)


class CudaStream:
    """The current CUDA stream of ``device_index``, as ``time_calls`` drives it."""

    clock = staticmethod(time.perf_counter)

    def __init__(self, device_index: int):
        self._cycles_per_ms = _sleep_cycles_per_ms(device_index)

    def record(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end)

    def reached(self, event: torch.cuda.Event) -> bool:
        return event.query()

    def spin(self, ms: float) -> None:
        torch.cuda._sleep(max(1, int(ms * self._cycles_per_ms)))

    def synchronize(self) -> None:
        torch.cuda.synchronize()


def time_cuda(fn: Callable[[], object], warmup: int = 10, iters: int = 50, flush_l2: bool = True) -> float:
    """Median kernel milliseconds of one call of ``fn`` on the current CUDA device, over ``iters`` batches of
    back-to-back calls with no host time in them (``time_calls``; the module docstring says how). With
    ``flush_l2`` each call starts from a cold L2 (flushed before every call, the flushes' time taken off);
    without it calls run from a warm L2. A call of ``MIN_BATCH_MS`` or more is a batch of its own, timed as
    one call between two events after the flush."""
    device = torch.cuda.current_device()
    flush = _flush_buffer(device).zero_ if flush_l2 else None
    timing = time_calls(CudaStream(device), fn, flush, warmup=warmup, iters=iters)
    if timing.host_bound and timing.calls_per_batch > 1:  # a long call fails the check by filling the queue alone
        print(f"\ntime_cuda: {timing.host_bound} batch(es) of {timing.calls_per_batch} call(s) could not be queued "
              "ahead of the GPU (a call that synchronises?): host time is in those")
    return timing.ms


@functools.cache
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


@functools.cache
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
    from gpt2fast.ops._cuda_loader import cuda_ops_status, load_cuda_ops

    if load_cuda_ops() is None:
        pytest.skip(f"ours (cuda): the CUDA C++ ops are not available: {cuda_ops_status().reason}")


def first_call(backend: str, fn: Callable[[], object]):
    """Call ``fn`` (our op on ``backend``) once and return its result. Where that backend cannot run this op
    here (a dtype or shape its kernels do not cover: ``BackendUnavailable``, which says why) the test is
    skipped with the reason; any other exception propagates and fails the test."""
    try:
        return fn()
    except BackendUnavailable as e:
        pytest.skip(f"ours ({backend}): {e}")


def run_benchmark(benchmark, fn: Callable[[], object], rounds: int = 20) -> None:
    """Let pytest-benchmark time ``fn`` too (for its table), synchronising so each round is the GPU's time
    plus the launch, not just the launch."""
    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, setup=torch.cuda.synchronize, rounds=rounds, warmup_rounds=3, iterations=1)


# ------------------------------------------------------------------------------- memory-bound op benchmarks
# The LayerNorm and bias + GELU suites: each group holds ours (triton), ours (cuda), eager PyTorch and
# torch.compile of the same PyTorch code, and a plain device copy of the same bytes (the practical ceiling).
MEMORY_BOUND_IMPLS = [*OURS_BACKENDS, "torch", "compile", "copy"]
MEMORY_BOUND_LABELS = {"triton": "ours (triton)", "cuda": "ours (cuda)", "torch": "PyTorch eager",
                       "compile": "torch.compile"}


def memory_bound_impl(impl: str, ours: Callable[[str], Callable], eager: Callable) -> Callable:
    """The function under test: ``ours(backend)`` for our backends (skipping one that cannot run here),
    torch.compile of ``eager``, or ``eager`` itself (also for "copy", which ``measure_memory_bound`` replaces
    by a clone)."""
    if impl in OURS_BACKENDS:
        require_backend(impl)
        return ours(impl)
    return torch.compile(eager) if impl == "compile" else eager


def measure_memory_bound(benchmark, group: str, impl: str, fn: Callable[[], object], nbytes: int, *,
                         suite: str) -> None:
    """Time ``fn`` (``impl`` of ``MEMORY_BOUND_IMPLS``), moving ``nbytes`` of DRAM traffic, into ``group``:
    GB/s and shares of peak and of a copy of as many bytes; one summary row per ours x peer pair."""
    benchmark.group = group
    if impl == "copy":  # the same bytes through a plain clone: read half, write half
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        fn = src.clone
    else:
        first_call(impl, fn)  # our path may not cover the op: skip, with the reason
    ms = time_cuda(fn)
    figures = report(benchmark, f"{group} [{impl}]", ms, bytes=nbytes, copy_bandwidth=copy_gb_per_s(nbytes))
    if impl in MEMORY_BOUND_LABELS:  # the copy is the ceiling behind "share of copy bandwidth", not a peer
        record_figures(group, "ours" if impl in OURS_BACKENDS else "peer", MEMORY_BOUND_LABELS[impl], figures,
                       suite=suite)
    run_benchmark(benchmark, fn)
