"""GPU benchmarks of the fused residual add + LayerNorm (gpt2fast.ops.layer_norm) against PyTorch and
torch.compile, bf16, at GPT-2 small's activation (16384 x 768).

    pytest benchmarks/test_bench_layer_norm.py --benchmark-only -s

Each group holds ours (triton) and ours (cuda), eager PyTorch (``h = x + r; F.layer_norm(h)``) and torch.compile
of the same code, and a plain device copy of the same bytes, the practical ceiling (``gpu_timing``'s
memory-bound helpers). Figures (kernel time per call from batches between CUDA events, L2 flushed before each
call) land in ``extra_info`` and are printed: ms, GB/s of the bytes the op must move, shares of the detected
GPU's, the V100's, A100's and H100's peak bandwidth and of the measured copy bandwidth; each ours x peer pair is a
row of the end-of-session summary. Skipped without a CUDA GPU; ours (cuda) is skipped, with the reason, where the
CUDA C++ ops are not built or do not cover the op.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_timing import MEMORY_BOUND_IMPLS, measure_memory_bound, memory_bound_impl, needs_gpu

# A mark, not a module-level skip: without a GPU the benchmarks are still collected (tools/gpu_session.sh
# --dry-run lists them) and each one is skipped with the reason.
pytestmark = needs_gpu("LayerNorm is")

DTYPE = torch.bfloat16
ROWS, WIDTH = 16384, 768  # GPT-2 small: batch 16 x 1024 tokens, d_model 768
SUITE = "layer_norm"


def _eager_residual_ln(x, r, w, b):
    h = x + r
    return F.layer_norm(h, (h.shape[-1],), w, b), h


def _ours(backend):
    from gpt2fast.ops.layer_norm import layer_norm

    return lambda x, r, w, b: layer_norm(x, w, b, residual=r, backend=backend)


def _inputs(requires_grad=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    x, r = (torch.randn(ROWS, WIDTH, device="cuda", dtype=DTYPE, generator=g).requires_grad_(requires_grad)
            for _ in range(2))
    w = (1 + 0.1 * torch.randn(WIDTH, device="cuda", generator=g)).to(DTYPE).requires_grad_(requires_grad)
    b = (0.1 * torch.randn(WIDTH, device="cuda", generator=g)).to(DTYPE).requires_grad_(requires_grad)
    return x, r, w, b


@pytest.mark.parametrize("impl", MEMORY_BOUND_IMPLS)
def test_residual_layer_norm_forward(benchmark, impl):
    x, r, w, b = _inputs()
    fn = memory_bound_impl(impl, _ours, _eager_residual_ln)
    nbytes = 4 * x.numel() * x.element_size()  # read x, r; write y, h
    measure_memory_bound(benchmark, f"residual + LayerNorm fwd {ROWS}x{WIDTH}", impl, lambda: fn(x, r, w, b), nbytes,
                         suite=SUITE)


@pytest.mark.parametrize("impl", MEMORY_BOUND_IMPLS)
def test_residual_layer_norm_forward_backward(benchmark, impl):
    x, r, w, b = _inputs(requires_grad=True)
    dy, dh = torch.randn_like(x), torch.randn_like(x)
    fwd = memory_bound_impl(impl, _ours, _eager_residual_ln)

    def step():
        y, h = fwd(x, r, w, b)
        torch.autograd.grad([y, h], [x, r, w, b], [dy, dh])

    # forward: read x, r, write y, h; backward: read h, dy, dh, write dx (dresidual is the same tensor)
    nbytes = 8 * x.numel() * x.element_size()
    measure_memory_bound(benchmark, f"residual + LayerNorm fwd+bwd {ROWS}x{WIDTH}", impl, step, nbytes, suite=SUITE)
