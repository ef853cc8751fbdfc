"""Cross-entropy benchmarks on the GPU: gpt2fast.ops against the stock PyTorch ways, in the same run.

    pytest benchmarks/test_bench_cross_entropy.py --benchmark-only -s

GPT-2's loss at batch 16 x 1024 tokens: bf16 logits 16384 x 50257.
  cross_entropy, forward + backward: ours (triton) and ours (cuda) vs ``F.cross_entropy(logits.float(), t)``
      (the stock way, with its fp32 copy of the logits) vs ``torch.compile`` of that. Goal: ours >= 3x faster
      than the stock way (15.4 ms on an H100), with no fp32 copy.
  linear_cross_entropy, forward + backward: hidden 16384 x 768, weight 50257 x 768; ours (chunked, the
      logits never all exist; triton, cuda, and torch per chunk) vs materialising ``hidden @ weight.T`` and
      the stock loss.
  block sweep: the kernels at several block widths and warp counts, for tuning FORWARD_MAX_BLOCK /
      BACKWARD_MAX_BLOCK.

Times are medians of CUDA-event-timed calls with L2 flushed between them (``gpu_timing.time_cuda``). GB/s are
computed over the traffic of our kernels (one read of the logits forward, one read and one write backward:
3 x 1.65 GB), so for the peers they are a speed on the same scale, not their own traffic. Peak memory is
``torch.cuda.max_memory_allocated`` during one call minus what was allocated before it (the inputs), so it
includes the gradient the call returns. Figures land in each benchmark's ``extra_info`` and are printed
(run with ``-s`` to see them); times (with GB/s or TFLOP/s and the shares of peak) and peak memory are rows of
the end-of-session summary. ours (cuda) is skipped, with the reason, where the CUDA C++ ops are not built or do
not cover the op. Nothing here asserts a speed; the only asserts check that what is timed agrees.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from bench_results import Figure, record
from gpu_timing import (
    OURS_BACKENDS,
    copy_gb_per_s,
    first_call,
    measure_once,
    needs_gpu,
    record_figures,
    report,
    require_backend,
    run_benchmark,
    time_cuda,
)

from gpt2fast.ops import cross_entropy, linear_cross_entropy

pytestmark = needs_gpu("the cross-entropy kernels are")


ce_module = importlib.import_module("gpt2fast.ops.cross_entropy")

ROWS, VOCAB, WIDTH = 16384, 50257, 768
GOAL = 3.0  # ours vs F.cross_entropy(logits.float(), t), forward + backward
WARMUP, ITERS = 5, 20
SUITE = "cross_entropy"
STOCK = "F.cross_entropy(logits.float())"


@pytest.fixture(params=OURS_BACKENDS)
def backend(request) -> str:
    require_backend(request.param)
    return request.param


@pytest.fixture(scope="module")
def logits_and_targets():
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (2 * torch.randn(ROWS, VOCAB, device="cuda", generator=g)).to(torch.bfloat16)
    targets = torch.randint(0, VOCAB, (ROWS,), device="cuda", generator=g)
    return logits, targets


@pytest.fixture(scope="module")
def hidden_weight_targets():
    g = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(ROWS, WIDTH, device="cuda", generator=g).to(torch.bfloat16)
    weight = (0.05 * torch.randn(VOCAB, WIDTH, device="cuda", generator=g)).to(torch.bfloat16)
    targets = torch.randint(0, VOCAB, (ROWS,), device="cuda", generator=g)
    return hidden, weight, targets


def peak_extra_mib(fn) -> float:
    """MiB allocated at the peak of one call of ``fn`` beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**20


def measure(name: str, fn, *, bytes=None, flops=None, copy_bandwidth=None) -> dict:
    ms = time_cuda(fn, warmup=WARMUP, iters=ITERS)
    figures = report(None, name, ms, bytes=bytes, flops=flops, copy_bandwidth=copy_bandwidth)
    figures["peak_extra_MiB"] = round(peak_extra_mib(fn), 1)
    print(f"{name}: peak extra memory {figures['peak_extra_MiB']} MiB")
    return figures


def record_time_and_memory(group: str, role: str, impl: str, figures: dict, **goal) -> None:
    """The time per call (with its rate and shares of peak) in ``group``, the peak memory in ``group``'s
    memory twin (lower is better)."""
    record_figures(group, role, impl, figures, suite=SUITE, **goal)
    record(f"{group}, peak extra memory", role, Figure(impl, figures["peak_extra_MiB"], "MiB", higher_is_better=False),
           suite=SUITE)


def fwd_bwd(loss_fn, x, *rest):
    """One forward and backward; returns the loss and the gradients (so they are not freed early)."""
    loss = loss_fn(x, *rest)
    return loss, torch.autograd.grad(loss, x)


def stock_loss(logits, targets):
    return F.cross_entropy(logits.float(), targets)


def _compiled_figures(x, targets, traffic):
    """torch.compile of the stock loss, or None (printed why) where it cannot compile."""
    try:
        compiled_loss = torch.compile(stock_loss)
        compiled = lambda: fwd_bwd(compiled_loss, x, targets)  # noqa: E731
        compiled()
        return measure("torch.compile(F.cross_entropy(logits.float()))", compiled, bytes=traffic)
    except Exception as e:  # no C compiler, an inductor bug: report it, keep the other figures
        print(f"torch.compile unavailable: {type(e).__name__}: {e}")
        return None


def test_cross_entropy_fwd_bwd(benchmark, logits_and_targets, backend):
    logits, targets = logits_and_targets
    x = logits.detach().requires_grad_()
    traffic = 3 * logits.nbytes
    copy_bw = copy_gb_per_s(2 * logits.nbytes)
    impl = f"ours ({backend})"

    ours = lambda: fwd_bwd(lambda a, t: cross_entropy(a, t, backend=backend), x, targets)  # noqa: E731
    stock = lambda: fwd_bwd(stock_loss, x, targets)  # noqa: E731
    loss_ours, (g_ours,) = first_call(backend, ours)
    loss_stock, (g_stock,) = stock()
    torch.testing.assert_close(loss_ours, loss_stock, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g_ours.float(), g_stock.float(), rtol=2e-2, atol=1e-3 * g_stock.abs().max().item())
    del g_ours, g_stock

    results = {"ours": measure(f"cross_entropy {impl}", ours, bytes=traffic, copy_bandwidth=copy_bw),
               "stock": measure_once("ce stock", lambda: measure(STOCK, stock, bytes=traffic))}
    compiled = measure_once("ce compiled", lambda: _compiled_figures(x, targets, traffic))
    if compiled is not None:
        results["compiled"] = compiled
    # The pieces of ours, for tuning: the forward pass alone (no_grad), and the backward pass by difference.
    with torch.no_grad():
        results["ours_forward"] = measure(f"cross_entropy {impl}, forward only", lambda: cross_entropy(
            logits, targets, backend=backend), bytes=logits.nbytes, copy_bandwidth=copy_bw)

    group = f"cross_entropy fwd+bwd {ROWS}x{VOCAB} bf16"
    record_time_and_memory(group, "ours", impl, results["ours"], goal=GOAL, goal_peer=STOCK)
    record_time_and_memory(group, "peer", STOCK, results["stock"])
    if "compiled" in results:
        record_time_and_memory(group, "peer", "torch.compile", results["compiled"])
    speedup = results["stock"]["ms"] / results["ours"]["ms"]
    line = (f"cross_entropy fwd+bwd {ROWS}x{VOCAB} bf16: {impl} {results['ours']['ms']:.3f} ms vs stock "
            f"{results['stock']['ms']:.3f} ms = {speedup:.2f}x (goal >= {GOAL:g}x: "
            f"{'met' if speedup >= GOAL else 'NOT met'})")
    if "compiled" in results:
        line += f"; torch.compile {results['compiled']['ms']:.3f} ms"
    print(line)
    benchmark.extra_info.update({f"{who}_{k}": v for who, figs in results.items() for k, v in figs.items()})
    benchmark.extra_info.update(backend=backend, speedup_vs_stock=round(speedup, 2), goal=GOAL)
    run_benchmark(benchmark, ours)


def test_linear_cross_entropy_fwd_bwd(benchmark, hidden_weight_targets, backend):
    hidden, weight, targets = hidden_weight_targets
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    flops = 3 * 2 * ROWS * VOCAB * WIDTH  # logits, d_hidden, d_weight

    def run(loss_fn):
        loss = loss_fn(h, w, targets)
        return loss, torch.autograd.grad(loss, (h, w))

    ours = lambda: run(lambda a, b, t: linear_cross_entropy(a, b, t, backend=backend))  # noqa: E731
    ours_torch = lambda: run(lambda a, b, t: linear_cross_entropy(a, b, t, backend="torch"))  # noqa: E731
    stock = lambda: run(lambda a, b, t: F.cross_entropy((a @ b.T).float(), t))  # noqa: E731
    loss_ours, grads_ours = first_call(backend, ours)
    loss_stock, grads_stock = stock()
    torch.testing.assert_close(loss_ours, loss_stock, rtol=1e-3, atol=1e-3)
    for a, b in zip(grads_ours, grads_stock):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=1e-2 * b.abs().max().item())
    del grads_ours, grads_stock

    chunk = ce_module.default_chunk_size(ROWS, VOCAB, WIDTH)
    materialised = "hidden @ weight.T, then F.cross_entropy(.float())"
    results = {"ours": measure(f"linear_cross_entropy ours ({backend}, chunk {chunk})", ours, flops=flops),
               "ours_torch": measure_once("lce torch per chunk", lambda: measure(
                   f"linear_cross_entropy ours (torch per chunk, chunk {chunk})", ours_torch, flops=flops)),
               "stock": measure_once("lce stock", lambda: measure(materialised, stock, flops=flops))}
    group = f"linear_cross_entropy fwd+bwd {ROWS}x{WIDTH} @ {VOCAB}x{WIDTH} bf16"
    record_time_and_memory(group, "ours", f"ours ({backend})", results["ours"])
    record_time_and_memory(group, "ours", "ours (torch per chunk)", results["ours_torch"])
    record_time_and_memory(group, "peer", materialised, results["stock"])
    print(f"linear_cross_entropy fwd+bwd: ours {results['ours']['ms']:.3f} ms, "
          f"{results['ours']['peak_extra_MiB']:.0f} MiB vs materialised {results['stock']['ms']:.3f} ms, "
          f"{results['stock']['peak_extra_MiB']:.0f} MiB")
    benchmark.extra_info.update({f"{who}_{k}": v for who, figs in results.items() for k, v in figs.items()})
    benchmark.extra_info.update(backend=backend, chunk_size=chunk)
    run_benchmark(benchmark, ours)


@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_block_sweep(benchmark, logits_and_targets, kernel):
    """Each kernel alone at several (block, warps): GB/s, for choosing the defaults."""
    logits, targets = logits_and_targets
    loss, lse = ce_module._launch_forward(logits, targets, -100)
    scale = torch.full((1,), 1.0 / ROWS, device="cuda")
    grad = torch.empty_like(logits)
    traffic = logits.nbytes * (1 if kernel == "forward" else 2)
    copy_bw = copy_gb_per_s(2 * logits.nbytes)
    table = {}
    for block in (1024, 2048, 4096, 8192, 16384):
        for warps in (4, 8, 16, 32):
            if block // (32 * warps) < 8:  # fewer than 8 elements a thread: one 16-byte load or less
                continue
            def fn(block=block, warps=warps):
                if kernel == "forward":
                    return ce_module._launch_forward(logits, targets, -100, block=block, num_warps=warps)
                return ce_module._launch_backward(logits, targets, lse, scale, -100, grad, block=block,
                                                  num_warps=warps)

            ms = time_cuda(fn, warmup=3, iters=10)
            figures = report(None, f"{kernel} block {block} warps {warps}", ms, bytes=traffic,
                             copy_bandwidth=copy_bw)
            table[f"{block}x{warps}"] = figures["GB/s"]
    best = max(table, key=table.get)
    default = ce_module._block(VOCAB, ce_module.FORWARD_MAX_BLOCK if kernel == "forward"
                               else ce_module.BACKWARD_MAX_BLOCK)
    print(f"{kernel}: best {best} at {table[best]} GB/s; default block {default} warps "
          f"{ce_module._num_warps(default)}")
    benchmark.extra_info.update(kernel=kernel, best=best, **{f"GB/s_{k}": v for k, v in table.items()})
    if kernel == "forward":
        run_benchmark(benchmark, lambda: ce_module._launch_forward(logits, targets, -100))
    else:
        run_benchmark(benchmark, lambda: ce_module._launch_backward(logits, targets, lse, scale, -100, grad))
