"""Shared rules for testing ops against their references, and the marks of the tests that need a GPU.

Tolerance follows flash-attention's rule: compute the reference in float64; the fast path passes when its
largest error is at most twice the largest error of plain PyTorch run in the same low precision
(plus a few units in the last place of the dtype, for outputs that PyTorch happens to get exactly right).
No table of per-dtype magic numbers.

GPU-only tests carry ``needs_cuda`` (skipped, with the reason, without a CUDA GPU) and take the extension from
``cuda_ops_or_skip`` (skipped, with the reason, where it can be neither imported nor compiled).
"""
from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

needs_triton = pytest.mark.skipif(not (ON_GPU or INTERPRETING),
                                  reason="Triton kernels need a GPU, or TRITON_INTERPRET=1 on the CPU")
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="the CUDA C++ kernels need a CUDA GPU")


def max_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_outputs_within_flash_rule(op: str, ours, torch_lowprec, ref64) -> None:
    """``assert_within_flash_rule`` for each of an op's outputs (the forward's loss, then each gradient), and
    each of ours in the dtype PyTorch's own low-precision path gives."""
    for i, (o, lp, r) in enumerate(zip(ours, torch_lowprec, ref64)):
        assert o.dtype == lp.dtype, (op, i, o.dtype, lp.dtype)
        assert_within_flash_rule(f"{op} output {i}", o, lp, r)


def assert_within_flash_rule(name: str, ours: torch.Tensor, torch_lowprec: torch.Tensor, ref64: torch.Tensor):
    """max|ours - ref| <= 2 * max|torch_lowprec - ref| + 4 ulp(dtype) * max|ref|."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    ulp = torch.finfo(ours.dtype).eps
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    bound = 2 * max_error(torch_lowprec, ref64) + 4 * ulp * scale
    err = max_error(ours, ref64)
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (torch in {ours.dtype}: " \
                         f"{max_error(torch_lowprec, ref64):.3e})"


def fresh(shape, dtype, *, scale=1.0, requires_grad=True, seed=None):
    """A fresh random tensor on the test device (a new seed each call unless given)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else torch.randint(0, 2**31 - 1, ()).item())
    t = (torch.randn(shape, generator=g, dtype=torch.float32) * scale).to(DEVICE, dtype)
    return t.requires_grad_(requires_grad)


# ------------------------------------------------------------------------------------------- GPU-only tests
def cuda_ops_or_skip():
    """The CUDA ops extension module (on a GPU machine without the prebuilt module the first call compiles it,
    a few minutes once, then cached), or a skip saying why it cannot be had."""
    from gpt2fast.ops import _cuda_loader

    module = _cuda_loader.load_cuda_ops()
    if module is None:
        pytest.skip(f"gpt2fast._cuda_ops unavailable: {_cuda_loader.cuda_ops_status().reason}")
    return module


def cuda_dtypes():
    """The dtypes the CUDA kernels take on this GPU: bf16 from sm_80 on."""
    out = [torch.float32, torch.float16]
    if ON_GPU and torch.cuda.get_device_capability()[0] >= 8:
        out.append(torch.bfloat16)
    return out


def needs_sm80():
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the CUDA attention kernel needs sm_80+ (mma.m16n8k16)")


def cuda_randn(shape, dtype, seed, scale=1.0):
    """A seeded random CUDA tensor (drawn on the CPU, so the values do not depend on the GPU)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to("cuda", dtype)
