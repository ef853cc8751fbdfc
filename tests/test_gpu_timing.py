"""benchmarks/gpu_timing's batched kernel timing without a GPU: the batching arithmetic, and the whole
driver (``time_calls``, ``time_cuda``) on a simulated stream whose host pays a fixed time per launch."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_timing(monkeypatch):
    """benchmarks/gpu_timing (the benchmarks folder is not a package: put it on the path, as test_bench does)."""
    pytest.importorskip("torch")  # gpu_timing imports it
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_timing

    return gpu_timing


class SimulatedStream:
    """One CUDA stream and the host that feeds it, in milliseconds, with what ``gpu_timing.time_calls`` asks
    of a stream. A launch costs the host its host time, then is queued; the GPU runs what is queued in order,
    each item from when it was queued or when the one before it ended, whichever is later. ``op`` is the call
    under test (``host_ms`` of Python, then a ``kernel_ms`` kernel); ``flush`` the L2 flush; ``log`` what
    the GPU was given: K (op), F (flush), E (event), S (spin)."""

    EVENT_HOST_MS = 0.002
    EVENT_GPU_MS = 0.001  # an event's own time on the GPU: what the batch amortises besides the host time

    def __init__(self, kernel_ms: float, host_ms: float, flush_ms: float = 0.0, flush_host_ms: float = 0.004):
        self.kernel_ms, self.host_ms = kernel_ms, host_ms
        self.flush_ms, self.flush_host_ms = flush_ms, flush_host_ms
        self.now = 0.0  # the host's clock
        self.free = 0.0  # when the GPU is done with everything queued
        self.log = []

    def _queue(self, what: str, host_ms: float, gpu_ms: float) -> float:
        self.now += host_ms
        self.free = max(self.now, self.free) + gpu_ms
        self.log.append(what)
        return self.free

    def op(self):
        self._queue("K", self.host_ms, self.kernel_ms)

    def flush(self):
        self._queue("F", self.flush_host_ms, self.flush_ms)

    # ------------------------------------------------------------------ the stream time_calls drives
    def clock(self) -> float:
        return self.now / 1e3

    def record(self) -> float:
        return self._queue("E", self.EVENT_HOST_MS, self.EVENT_GPU_MS)

    def elapsed_ms(self, start: float, end: float) -> float:
        return end - start

    def reached(self, event: float) -> bool:
        return event <= self.now

    def spin(self, ms: float) -> None:
        self._queue("S", self.EVENT_HOST_MS, ms)

    def synchronize(self) -> None:
        self.now = max(self.now, self.free)


# ------------------------------------------------------------------------------- the arithmetic
def test_batch_size_fills_the_minimum_batch_within_the_cap(gpu_timing):
    assert gpu_timing.batch_size(0.25) == 4 and gpu_timing.batch_size(0.3) == 4  # ceil(1 / 0.3)
    assert gpu_timing.batch_size(0.03) == gpu_timing.MAX_BATCH == 32  # 34 would be needed
    assert gpu_timing.batch_size(1.0) == 1 and gpu_timing.batch_size(50.0) == 1  # long enough alone
    assert gpu_timing.batch_size(0.0) == gpu_timing.MAX_BATCH  # below the events' resolution
    assert gpu_timing.batch_size(0.1, min_batch_ms=2.0, max_batch=100) == 20
    assert gpu_timing.batch_size(0.1, min_batch_ms=2.0, max_batch=8) == 8


def test_per_call_ms_takes_the_flushes_off_then_the_median(gpu_timing):
    assert gpu_timing.per_call_ms([10.0, 12.0, 11.0], 4) == 2.75
    assert gpu_timing.per_call_ms([10.0, 12.0, 11.0, 30.0], 4, overhead_ms=2.0) == pytest.approx(2.375)
    assert gpu_timing.per_call_ms([5.0, 100.0, 5.5], 1) == 5.5  # one stray batch does not move it


def test_spin_covers_the_hosts_enqueue_time_with_margin(gpu_timing):
    assert gpu_timing.spin_ms(0.05, 32) == pytest.approx(gpu_timing.SPIN_MIN_MS + gpu_timing.SPIN_MARGIN * 1.6)
    assert gpu_timing.spin_ms(0.0, 32) == gpu_timing.SPIN_MIN_MS
    assert gpu_timing.spin_ms(0.1, 4, margin=3.0, floor=0.0) == pytest.approx(1.2)


# --------------------------------------------------------------------- the driver, simulated
def test_batched_timing_recovers_the_kernel_time_behind_host_overhead(gpu_timing):
    """A 30 us kernel behind 80 us of Python per call: one call between two events measures the host
    (about 110 us); the batch behind a spin measures the kernel."""
    stream = SimulatedStream(kernel_ms=0.03, host_ms=0.08)
    per_call, host_ms = gpu_timing.time_per_call(stream, stream.op)
    assert per_call == pytest.approx(0.08 + 0.03, rel=0.05) and per_call > 3 * 0.03  # the old way: host time
    assert host_ms == pytest.approx(0.08, rel=0.1)

    timing = gpu_timing.time_calls(stream, stream.op, warmup=2, iters=10)
    assert timing.ms == pytest.approx(0.03, rel=0.01)
    assert timing.calls_per_batch == gpu_timing.batch_size(per_call) == 10  # ceil(1 ms / 0.11 ms)
    assert timing.batches == 10 and timing.host_bound == 0 and timing.flush_ms == 0.0
    assert "F" not in stream.log


def test_batched_timing_without_host_overhead_agrees_with_one_call(gpu_timing):
    """Where the host is faster than the kernel, both ways measure about the kernel (one call alone, plus
    the host's latency before its launch): batching removes that latency and nothing else."""
    stream = SimulatedStream(kernel_ms=0.2, host_ms=0.01)
    per_call, _ = gpu_timing.time_per_call(stream, stream.op)
    timing = gpu_timing.time_calls(stream, stream.op, warmup=1, iters=5)
    assert per_call == pytest.approx(0.2 + 0.01, rel=0.02) and timing.ms == pytest.approx(0.2, rel=0.01)
    assert timing.calls_per_batch == 5


def test_cold_l2_batches_flush_before_every_call_and_take_the_flushes_off(gpu_timing):
    stream = SimulatedStream(kernel_ms=0.03, host_ms=0.05, flush_ms=0.08)
    timing = gpu_timing.time_calls(stream, stream.op, stream.flush, warmup=2, iters=10)
    assert timing.ms == pytest.approx(0.03, rel=0.02)
    assert timing.flush_ms == pytest.approx(0.08, rel=0.01) and timing.host_bound == 0
    timed = "".join(stream.log[2:]).replace("E", "").replace("S", "")  # after the warmup: ops and flushes
    assert "KK" not in timed and timed.count("K") == 3 + 10 * timing.calls_per_batch  # the estimate, batches
    assert timed.endswith("F" * (timing.calls_per_batch - 1))  # and the batches of flushes alone


def test_a_long_call_is_one_call_per_batch_after_its_flush(gpu_timing):
    stream = SimulatedStream(kernel_ms=5.0, host_ms=0.2, flush_ms=0.08)
    timing = gpu_timing.time_calls(stream, stream.op, stream.flush, warmup=1, iters=4)
    assert timing.calls_per_batch == 1 and timing.flush_ms == 0.0  # no flush inside a batch: none taken off
    assert timing.ms == pytest.approx(5.0, rel=0.001)  # behind the spin: not even the host's 0.2 ms


def test_a_spin_too_short_is_redone_longer(gpu_timing):
    """The host slows down after the estimate (the spin, sized from it, is too short): the batch is redone
    behind a longer spin and still holds kernel time only."""
    stream = SimulatedStream(kernel_ms=0.03, host_ms=0.01)

    def op():
        if stream.log.count("K") == 1 + 3:  # the warmup and the estimate done
            stream.host_ms = 0.2
        stream.op()

    timing = gpu_timing.time_calls(stream, op, warmup=1, iters=5)
    assert timing.host_bound == 0 and timing.ms == pytest.approx(0.03, rel=0.01)
    assert stream.log.count("S") == 5 + 1  # the first batch was redone once, the rest sized from it


def test_a_call_that_synchronises_is_counted_host_bound(gpu_timing):
    """A call that waits for the GPU (``.item()``, say) cannot be queued ahead: its batches hold host time,
    are counted, and are redone only while there is hope (``SPIN_TRIES`` for the first, then once each)."""
    stream = SimulatedStream(kernel_ms=0.03, host_ms=0.05)

    def op():
        stream.op()
        stream.synchronize()

    timing = gpu_timing.time_calls(stream, op, warmup=1, iters=6)
    assert timing.host_bound == 6 and timing.ms > 0.05
    assert stream.log.count("S") == gpu_timing.SPIN_TRIES + 5


def test_time_cuda_drives_the_stream_with_the_flush_buffer(gpu_timing, monkeypatch, capsys):
    stream = SimulatedStream(kernel_ms=0.03, host_ms=0.08, flush_ms=0.06)
    monkeypatch.setattr(gpu_timing.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(gpu_timing, "CudaStream", lambda device: stream)
    monkeypatch.setattr(gpu_timing, "_flush_buffer", lambda device: SimpleNamespace(zero_=stream.flush))
    assert gpu_timing.time_cuda(stream.op, warmup=2, iters=10) == pytest.approx(0.03, rel=0.02)
    assert "F" in stream.log
    stream.log.clear()
    assert gpu_timing.time_cuda(stream.op, warmup=2, iters=10, flush_l2=False) == pytest.approx(0.03, rel=0.01)
    assert "F" not in stream.log and capsys.readouterr().out == ""

    def synchronising():
        stream.op()
        stream.synchronize()

    gpu_timing.time_cuda(synchronising, warmup=1, iters=3, flush_l2=False)
    assert "could not be queued ahead of the GPU" in capsys.readouterr().out


def test_first_call_skips_only_when_the_backend_cannot_run(gpu_timing):
    """A path that cannot run here (BackendUnavailable) is a skip with its reason; any other error from a path
    is a failure, not a skip."""
    from gpt2fast.ops import BackendUnavailable

    assert gpu_timing.first_call("cuda", lambda: 3) == 3

    def unavailable():
        raise BackendUnavailable("attention: the CUDA C++ backend cannot run here: head dim 48")

    with pytest.raises(pytest.skip.Exception, match=r"ours \(cuda\): attention: the CUDA C\+\+ backend cannot run"):
        gpu_timing.first_call("cuda", unavailable)
    for error in (RuntimeError("CUDA error: an illegal memory access"), ValueError("bad shape"),
                  NotImplementedError("not yet")):
        def broken(error=error):
            raise error

        with pytest.raises(type(error)):
            gpu_timing.first_call("cuda", broken)
