"""Attention benchmarks on the GPU: gpt2fast.ops.attention, ours (triton, flash style) and ours (cuda), against
PyTorch's ``F.scaled_dot_product_attention(is_causal=True)`` (flash / cuDNN / memory-efficient, whichever it
picks), in the same run. SDPA is the peer: torch.compile of it calls the same kernels.

    pytest benchmarks/test_bench_attention.py --benchmark-only -s

bf16, causal, head dim 64, at GPT-2 small's shape (B 16, H 12, T 1024) and a longer one (B 8, H 16, T 2048):
forward alone and forward + backward. Goal: ours no slower than SDPA in both (on an H100: SDPA 0.086 ms
forward, 0.456 ms forward + backward at B16 H12 T1024).

FLOPs counted as flash-attention does: a causal forward is two T x T x D matmuls over half the square,
4 * B * H * T^2 * D / 2; the backward is 2.5x the forward (five matmuls to the forward's two). TFLOP/s and the
shares of the detected GPU's dense bf16 peak, of the V100/A100/H100 peaks and of a bf16 matmul measured on the
spot come from ``gpu_timing.report``; each comparison is a row of the end-of-session summary. Times are
medians of CUDA-event-timed calls with L2 flushed in between (``gpu_timing.time_cuda``); the first call of
each shape runs the autotuner and is not timed. Figures land in each benchmark's ``extra_info`` and are
printed (``-s``). ours (cuda) is skipped, with the reason, where the CUDA C++ ops are not built or do not
cover attention. Nothing here asserts a speed; the only asserts check that what is timed agrees with SDPA.
"""
from __future__ import annotations

import functools
import importlib

import pytest
import torch
import torch.nn.functional as F
from gpu_timing import (
    OURS_BACKENDS,
    first_call,
    measure_once,
    needs_gpu,
    record_figures,
    report,
    require_backend,
    run_benchmark,
    time_cuda,
)

from gpt2fast.ops import attention

pytestmark = needs_gpu("the attention kernels are")


attention_module = importlib.import_module("gpt2fast.ops.attention")

SHAPES = [(16, 12, 1024, 64), (8, 16, 2048, 64)]  # (B, H, T, D)
GOAL = 1.0  # SDPA's time / ours
WARMUP, ITERS = 10, 50


def causal_forward_flops(B, H, T, D) -> float:
    return 4 * B * H * T * T * D / 2


def _shape_id(shape) -> str:
    return "B{}-H{}-T{}-D{}".format(*shape)


@pytest.fixture(scope="module", params=SHAPES, ids=_shape_id)
def inputs(request):
    B, H, T, D = request.param
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4))
    return request.param, q, k, v, do


@pytest.fixture(params=OURS_BACKENDS)
def backend(request) -> str:
    require_backend(request.param)
    return request.param


def ours(q, k, v, backend="triton"):
    return attention(q, k, v, causal=True, backend=backend)


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _fwd_bwd(fn, q, k, v, do):
    out = fn(q, k, v)
    return out, torch.autograd.grad(out, (q, k, v), do)  # returned, not accumulated into .grad


def _best_configs() -> dict:
    """The tile sizes the autotuner settled on for the last shape run (for tuning the config lists)."""
    found = {}
    for name in ("_attn_fwd_tuned", "_attn_bwd_dkdv_tuned", "_attn_bwd_dq_tuned"):
        best = getattr(getattr(attention_module, name, None), "best_config", None)
        if best is not None:
            found[name.split("_", 2)[2]] = f"{best.kwargs} warps {best.num_warps} stages {best.num_stages}"
    return found


def _compare(benchmark, label, shape, backend, ours_fn, sdpa_fn, flops):
    group = f"attention {label} {_shape_id(shape)}"
    impl = f"ours ({backend})"
    results = {"ours": report(None, f"{label} {impl}", time_cuda(ours_fn, WARMUP, ITERS), flops=flops),
               "sdpa": measure_once((group, "sdpa"), lambda: report(
                   None, f"{label} F.scaled_dot_product_attention", time_cuda(sdpa_fn, WARMUP, ITERS), flops=flops))}
    record_figures(group, "ours", impl, results["ours"], suite="attention", goal=GOAL)
    record_figures(group, "peer", "SDPA", results["sdpa"], suite="attention")
    speedup = results["sdpa"]["ms"] / results["ours"]["ms"]
    tiles = _best_configs() if backend == "triton" else {}
    print(f"{label} {_shape_id(shape)} bf16 causal: {impl} {results['ours']['ms']:.3f} ms vs SDPA "
          f"{results['sdpa']['ms']:.3f} ms = {speedup:.2f}x (goal >= {GOAL:g}x: "
          f"{'met' if speedup >= GOAL else 'NOT met'})" + (f"; tiles: {tiles}" if tiles else ""))
    benchmark.group = group
    benchmark.extra_info.update({f"{who}_{k}": v for who, figs in results.items() for k, v in figs.items()})
    benchmark.extra_info.update(backend=backend, speedup_vs_sdpa=round(speedup, 3), goal=GOAL, tiles=tiles)
    run_benchmark(benchmark, ours_fn)


def test_forward(benchmark, inputs, backend):
    shape, q, k, v, _ = inputs
    with torch.no_grad():
        out = first_call(backend, lambda: ours(q, k, v, backend))  # also autotunes
        torch.testing.assert_close(out, sdpa(q, k, v), rtol=2e-2, atol=2e-2)
    del out
    flops = causal_forward_flops(*shape)

    def ours_fn():
        with torch.no_grad():
            return ours(q, k, v, backend)

    def sdpa_fn():
        with torch.no_grad():
            return sdpa(q, k, v)

    _compare(benchmark, "forward", shape, backend, ours_fn, sdpa_fn, flops)


def test_forward_backward(benchmark, inputs, backend):
    shape, q, k, v, do = inputs
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    ours_b = functools.partial(ours, backend=backend)
    out_ours, grads_ours = first_call(backend, lambda: _fwd_bwd(ours_b, q, k, v, do))
    out_sdpa, grads_sdpa = _fwd_bwd(sdpa, q, k, v, do)
    torch.testing.assert_close(out_ours, out_sdpa, rtol=2e-2, atol=2e-2)
    for a, b in zip(grads_ours, grads_sdpa):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * max(b.abs().max().item(), 1.0))
    del out_ours, grads_ours, out_sdpa, grads_sdpa
    flops = 3.5 * causal_forward_flops(*shape)
    _compare(benchmark, "forward+backward", shape, backend, lambda: _fwd_bwd(ours_b, q, k, v, do),
             lambda: _fwd_bwd(sdpa, q, k, v, do), flops)


def test_forward_backward_fused_qkv_layout(benchmark, inputs, backend):
    """As the model calls it: q, k, v strided views of one (B, T, 3, H, D) projection, dO arriving in
    (B, T, H, D) order. Ours reads the views in place; SDPA gets the same views."""
    shape, *_ = inputs
    B, H, T, D = shape
    qkv = torch.randn(B, T, 3, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)

    def run(fn):
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        out = fn(q, k, v)
        return out, torch.autograd.grad(out, qkv, do)

    ours_b = functools.partial(ours, backend=backend)
    out_ours, (g_ours,) = first_call(backend, lambda: run(ours_b))
    out_sdpa, (g_sdpa,) = run(sdpa)
    torch.testing.assert_close(out_ours, out_sdpa, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(g_ours, g_sdpa, rtol=5e-2, atol=5e-2 * max(g_sdpa.abs().max().item(), 1.0))
    del out_ours, g_ours, out_sdpa, g_sdpa
    _compare(benchmark, "forward+backward (fused qkv views)", shape, backend, lambda: run(ours_b),
             lambda: run(sdpa), 3.5 * causal_forward_flops(*shape))
