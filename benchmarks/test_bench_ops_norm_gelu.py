"""GPU benchmarks of the fused LayerNorm and bias+GELU kernels against PyTorch and torch.compile, bf16.

    pytest benchmarks/test_bench_ops_norm_gelu.py --benchmark-only -s

Each group holds ours (triton) and ours (cuda), eager PyTorch and torch.compile of the same PyTorch code (and a
plain device copy of the same bytes, the practical ceiling). Figures (kernel time per call from batches between
CUDA events, L2 flushed before each call; see gpu_timing.py) land in ``extra_info`` and are printed: ms, GB/s
of the bytes the op must move, shares of the detected GPU's, the V100's, A100's and H100's peak bandwidth and
of the measured copy bandwidth; each ours x peer pair is a row of the end-of-session summary. Skipped without a
CUDA GPU; ours (cuda) is skipped, with the reason, where the CUDA C++ ops are not built or do not cover the op.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_timing import (
    OURS_BACKENDS,
    copy_gb_per_s,
    first_call,
    record_figures,
    report,
    require_backend,
    run_benchmark,
    time_cuda,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: no CUDA device here")

DTYPE = torch.bfloat16
ROWS, WIDTH = 16384, 768  # GPT-2 small: batch 16 x 1024 tokens, d_model 768
MLP_WIDTH = 4 * WIDTH
IMPLS = [*OURS_BACKENDS, "torch", "compile", "copy"]
LABELS = {"triton": "ours (triton)", "cuda": "ours (cuda)", "torch": "PyTorch eager", "compile": "torch.compile"}
SUITE = "norm_gelu"


def _eager_residual_ln(x, r, w, b):
    h = x + r
    return F.layer_norm(h, (h.shape[-1],), w, b), h


def _eager_bias_gelu(x, bias):
    return F.gelu(x + bias, approximate="tanh")


def _impl(name, ours, eager):
    """The function under test: ``ours(backend)`` for our backends (skipping one that cannot run here),
    torch.compile of ``eager``, or ``eager`` itself (also for "copy", where it is replaced by a clone)."""
    if name in OURS_BACKENDS:
        require_backend(name)
        return ours(name)
    return torch.compile(eager) if name == "compile" else eager


def _measure(benchmark, group, impl, fn, nbytes):
    benchmark.group = group
    if impl == "copy":  # the same bytes through a plain clone: read half, write half
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        fn = src.clone
    else:
        first_call(impl, fn)  # our cuda path may not cover the op: skip, with the reason
    ms = time_cuda(fn)
    figures = report(benchmark, f"{group} [{impl}]", ms, bytes=nbytes, copy_bandwidth=copy_gb_per_s(nbytes))
    if impl in LABELS:  # the copy is the ceiling behind "share of copy bandwidth", not a peer
        record_figures(group, "ours" if impl in OURS_BACKENDS else "peer", LABELS[impl], figures, suite=SUITE)
    run_benchmark(benchmark, fn)


def _ln_inputs(requires_grad=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    x, r = (torch.randn(ROWS, WIDTH, device="cuda", dtype=DTYPE, generator=g).requires_grad_(requires_grad)
            for _ in range(2))
    w = (1 + 0.1 * torch.randn(WIDTH, device="cuda", generator=g)).to(DTYPE).requires_grad_(requires_grad)
    b = (0.1 * torch.randn(WIDTH, device="cuda", generator=g)).to(DTYPE).requires_grad_(requires_grad)
    return x, r, w, b


@pytest.mark.parametrize("impl", IMPLS)
def test_residual_layer_norm_forward(benchmark, impl):
    from gpt2fast.ops.layer_norm import layer_norm

    x, r, w, b = _ln_inputs()
    fn = _impl(impl, lambda backend: lambda x, r, w, b: layer_norm(x, w, b, residual=r, backend=backend),
               _eager_residual_ln)
    nbytes = 4 * x.numel() * x.element_size()  # read x, r; write y, h
    _measure(benchmark, "residual + LayerNorm fwd 16384x768", impl, lambda: fn(x, r, w, b), nbytes)


@pytest.mark.parametrize("impl", IMPLS)
def test_residual_layer_norm_forward_backward(benchmark, impl):
    from gpt2fast.ops.layer_norm import layer_norm

    x, r, w, b = _ln_inputs(requires_grad=True)
    dy, dh = torch.randn_like(x), torch.randn_like(x)
    fwd = _impl(impl, lambda backend: lambda x, r, w, b: layer_norm(x, w, b, residual=r, backend=backend),
                _eager_residual_ln)

    def step():
        y, h = fwd(x, r, w, b)
        torch.autograd.grad([y, h], [x, r, w, b], [dy, dh])

    # forward: read x, r, write y, h; backward: read h, dy, dh, write dx (dresidual is the same tensor)
    nbytes = 8 * x.numel() * x.element_size()
    _measure(benchmark, "residual + LayerNorm fwd+bwd 16384x768", impl, step, nbytes)


def _gelu_inputs(requires_grad=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(ROWS, MLP_WIDTH, device="cuda", dtype=DTYPE, generator=g).requires_grad_(requires_grad)
    bias = (0.1 * torch.randn(MLP_WIDTH, device="cuda", generator=g)).to(DTYPE).requires_grad_(requires_grad)
    return x, bias


@pytest.mark.parametrize("impl", IMPLS)
def test_bias_gelu_forward(benchmark, impl):
    from gpt2fast.ops.bias_gelu import bias_gelu

    x, bias = _gelu_inputs()
    fn = _impl(impl, lambda backend: lambda x, b: bias_gelu(x, b, backend=backend), _eager_bias_gelu)
    nbytes = 2 * x.numel() * x.element_size()  # read x, write y
    _measure(benchmark, "bias + GELU fwd 16384x3072", impl, lambda: fn(x, bias), nbytes)


@pytest.mark.parametrize("impl", IMPLS)
def test_bias_gelu_backward(benchmark, impl):
    from gpt2fast.ops.bias_gelu import bias_gelu

    x, bias = _gelu_inputs(requires_grad=True)
    dy = torch.randn_like(x)
    fwd = _impl(impl, lambda backend: lambda x, b: bias_gelu(x, b, backend=backend), _eager_bias_gelu)
    y = first_call(impl, lambda: fwd(x, bias))
    nbytes = 3 * x.numel() * x.element_size()  # read x (or x + bias), dy; write dx

    def backward():
        torch.autograd.grad([y], [x, bias], [dy], retain_graph=True)

    _measure(benchmark, "bias + GELU bwd 16384x3072", impl, backward, nbytes)
