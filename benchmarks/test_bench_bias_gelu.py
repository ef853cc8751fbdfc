"""GPU benchmarks of the fused bias + GELU (gpt2fast.ops.bias_gelu) against PyTorch and torch.compile, bf16, at
GPT-2 small's MLP activation (16384 x 3072).

    pytest benchmarks/test_bench_bias_gelu.py --benchmark-only -s

Each group holds ours (triton) and ours (cuda), eager PyTorch (``F.gelu(x + bias, approximate="tanh")``) and
torch.compile of the same code, and a plain device copy of the same bytes, the practical ceiling
(``gpu_timing``'s memory-bound helpers). Figures: ms, GB/s of the bytes the op must move and its shares of peak
and of the measured copy bandwidth, in ``extra_info``, printed, and one summary row per ours x peer pair.
Skipped without a CUDA GPU; ours (cuda) is skipped, with the reason, where the CUDA C++ ops are not built or do
not cover the op.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_timing import MEMORY_BOUND_IMPLS, first_call, measure_memory_bound, memory_bound_impl, needs_gpu

# A mark, not a module-level skip: without a GPU the benchmarks are still collected (tools/gpu_session.sh
# --dry-run lists them) and each one is skipped with the reason.
pytestmark = needs_gpu("bias+GELU is")

DTYPE = torch.bfloat16
ROWS, WIDTH = 16384, 4 * 768  # GPT-2 small's MLP: batch 16 x 1024 tokens, 4 x d_model
SUITE = "bias_gelu"


def _eager_bias_gelu(x, bias):
    return F.gelu(x + bias, approximate="tanh")


def _ours(backend):
    from gpt2fast.ops.bias_gelu import bias_gelu

    return lambda x, b: bias_gelu(x, b, backend=backend)


def _inputs(requires_grad=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(ROWS, WIDTH, device="cuda", dtype=DTYPE, generator=g).requires_grad_(requires_grad)
    bias = (0.1 * torch.randn(WIDTH, device="cuda", generator=g)).to(DTYPE).requires_grad_(requires_grad)
    return x, bias


@pytest.mark.parametrize("impl", MEMORY_BOUND_IMPLS)
def test_bias_gelu_forward(benchmark, impl):
    x, bias = _inputs()
    fn = memory_bound_impl(impl, _ours, _eager_bias_gelu)
    nbytes = 2 * x.numel() * x.element_size()  # read x, write y
    measure_memory_bound(benchmark, f"bias + GELU fwd {ROWS}x{WIDTH}", impl, lambda: fn(x, bias), nbytes,
                         suite=SUITE)


@pytest.mark.parametrize("impl", MEMORY_BOUND_IMPLS)
def test_bias_gelu_backward(benchmark, impl):
    x, bias = _inputs(requires_grad=True)
    dy = torch.randn_like(x)
    fwd = memory_bound_impl(impl, _ours, _eager_bias_gelu)
    y = first_call(impl, lambda: fwd(x, bias))
    nbytes = 3 * x.numel() * x.element_size()  # read x (or x + bias), dy; write dx

    def backward():
        torch.autograd.grad([y], [x, bias], [dy], retain_graph=True)

    measure_memory_bound(benchmark, f"bias + GELU bwd {ROWS}x{WIDTH}", impl, backward, nbytes, suite=SUITE)
