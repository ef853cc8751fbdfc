"""GELU (tanh approximation) of x + bias, the bias broadcast over the last dimension.

    a = bias_gelu(x, bias)          # == F.gelu(x + bias, approximate="tanh")

GPT-2's MLP applies its first Linear's bias and the GELU in one elementwise pass over the (rows, 4 * d)
activation: one read of x and one write of the output, computed in fp32 in registers. The backward pass reads
x and the incoming gradient once, writes dx, and reduces dbias over the rows as per-program partial sums that
a second kernel adds up in a fixed order (deterministic, no atomics).

This file holds all three paths, in this order: the plain-PyTorch ``bias_gelu_reference``; the dispatch
(``bias_gelu``); the Triton kernels (GPU, or CPU under TRITON_INTERPRET=1); and the CUDA C++ kernels
(csrc/kernels/bias_gelu.cu) registered as the custom operators ``torch.ops.gpt2fast.bias_gelu_fwd`` and
``bias_gelu_bwd``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2fast.ops import _common, _dispatch
from gpt2fast.ops._common import cuda_module, cuda_op, tl, triton


# ---------------------------------------------------------------------------------------------- reference
def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: ``F.gelu(x + bias, approximate="tanh")``, in x's dtype."""
    _check_args(x, bias)
    return F.gelu(x + bias, approximate="tanh").to(x.dtype)


# ----------------------------------------------------------------------------------------------- dispatch
def bias_gelu(x: torch.Tensor, bias: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """tanh-approximation GELU of ``x + bias`` (bias of shape (x.shape[-1],)); output in x's dtype.

    Differentiable in x and bias. ``backend``: "auto" (the faster of the CUDA and Triton kernels where one
    can run, else the reference with a one-time warning), "cuda" or "triton" (an error where it cannot run) or
    "torch".
    """
    _check_args(x, bias)
    reason = _dispatch.why_not_triton([x, bias], extra=_shape_problem(x))
    path = _dispatch.choose("bias_gelu", backend, reason, lambda: _why_not_cuda(x, bias), (x, bias), run=_run,
                            bucket=_dispatch.shape_bucket(x.numel() // max(1, x.shape[-1]), x.shape[-1]))
    return _run(path, x, bias)


def _run(path: str, x, bias) -> torch.Tensor:
    if path == "torch":
        return bias_gelu_reference(x, bias)
    if path == "cuda":
        return _cuda_bias_gelu(x, bias)
    return _BiasGeluFn.apply(x, bias)


def _check_args(x: torch.Tensor, bias: torch.Tensor) -> None:
    if x.dim() < 1:
        raise ValueError("bias_gelu: x must have at least one dimension (the bias is added along the last), "
                         "got a scalar")
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (x.shape[-1],):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias_gelu: bias has shape {shape} but x has shape {tuple(x.shape)}; "
                         f"bias must have shape ({x.shape[-1]},) (x's last dimension)")


def _shape_problem(x: torch.Tensor) -> Optional[str]:
    if x.shape[-1] == 0:
        return "the rows are empty (last dimension 0)"
    return None  # columns are tiled, so any width works


def _why_not_cuda(x: torch.Tensor, bias: torch.Tensor) -> Optional[str]:
    extra = _shape_problem(x)
    if extra is None and bias.dtype not in (x.dtype, torch.float32):
        extra = f"the CUDA kernel takes a bias of x's dtype or float32, got {bias.dtype} for x of {x.dtype}"
    return _dispatch.why_not_cuda([x, bias], extra=extra)


# ============================================================================================ Triton path
def _floor_power_of_2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _tile(rows: int, width: int, elements: int):
    """(BLOCK_M, BLOCK_N): a tile of about ``elements`` values, at most 512 columns wide, no taller than needed."""
    block_n = min(triton.next_power_of_2(width), 512)
    block_m = min(max(elements // block_n, 1), triton.next_power_of_2(rows))
    return block_m, block_n


# ------------------------------------------------------------------------------------------------ kernels
if triton is not None:

    @triton.jit
    def _gelu_parts(z):
        # gelu_tanh(z) = 0.5 z (1 + tanh(u)) = z * sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3).
        # Returns sigmoid(2u) and sigmoid'(2u) = s (1 - s), both from t = exp(-|2u|) <= 1: no overflow, and
        # no 1 - s cancellation where s is close to 1 (which would cost the gradient several ulps).
        u2 = (2.0 * 0.7978845608028654) * (z + 0.044715 * z * z * z)
        t = tl.exp(-tl.abs(u2))
        r = 1.0 / (1.0 + t)
        s = tl.where(u2 >= 0, r, t * r)
        return s, t * r * r

    @triton.jit
    def _bias_gelu_fwd_kernel(X, B, Y, rows, width, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows_i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < width
        mask = (rows_i[:, None] < rows) & col_mask[None, :]
        offs = rows_i[:, None].to(tl.int64) * width + cols[None, :]
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
        z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
        s, _ = _gelu_parts(z)
        tl.store(Y + offs, (z * s).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _bias_gelu_bwd_kernel(X, B, DY, DX, DB_PARTIAL, rows, width,
                              TILES_PER_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # Program (g, c) owns TILES_PER_PROGRAM row tiles of column block c and writes row g of the dbias
        # partials. The trip count is compile-time (a power of two, so few variants): Triton 3.6's
        # interpreter cannot loop to a runtime bound under NumPy 2.
        group = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < width
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        first_row = group.to(tl.int64) * (TILES_PER_PROGRAM * BLOCK_M)
        for t in range(0, TILES_PER_PROGRAM):
            rows_i = first_row + t * BLOCK_M + tl.arange(0, BLOCK_M)
            mask = (rows_i[:, None] < rows) & col_mask[None, :]
            offs = rows_i[:, None] * width + cols[None, :]
            z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            s, ds = _gelu_parts(z)
            # d/dz [z * sigmoid(2u)] = s + z * s (1 - s) * d(2u)/dz
            du2 = (2.0 * 0.7978845608028654) * (1.0 + 3.0 * 0.044715 * z * z)
            dz = dy * (s + z * ds * du2)
            dz = tl.where(mask, dz, 0.0)
            tl.store(DX + offs, dz.to(DX.dtype.element_ty), mask=mask)
            db_acc += dz
        tl.store(DB_PARTIAL + group * width + cols, tl.sum(db_acc, axis=0), mask=col_mask)

    @triton.jit
    def _sum_partials_kernel(PARTIAL, OUT, groups, width,
                             CHUNKS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        # Column sums of the (groups, width) partials in a fixed order: deterministic.
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < width
        acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
        for chunk in range(0, CHUNKS):  # CHUNKS = cdiv(groups, BLOCK_P), compile-time as above
            g = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
            mask = (g[:, None] < groups) & col_mask[None, :]
            acc += tl.load(PARTIAL + g[:, None] * width + cols[None, :], mask=mask, other=0.0)
        tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=col_mask)


def _forward(x2: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    rows, width = x2.shape
    y = torch.empty_like(x2)
    if rows == 0:
        return y
    block_m, block_n = _tile(rows, width, 4096)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(width, block_n))
    _bias_gelu_fwd_kernel[grid](x2, bias, y, rows, width, BLOCK_M=block_m, BLOCK_N=block_n,
                                num_warps=8 if block_m * block_n >= 4096 else 4)
    return y


def _backward(x2: torch.Tensor, bias: torch.Tensor, dy2: torch.Tensor):
    rows, width = x2.shape
    dx = torch.empty_like(x2)
    db = torch.empty_like(bias)
    if rows == 0:
        return dx, db.zero_()
    block_m, block_n = _tile(rows, width, 2048)
    col_blocks = triton.cdiv(width, block_n)
    row_tiles = triton.cdiv(rows, block_m)
    groups_wanted = max(1, _common.programs_target(x2.device) // col_blocks)
    tiles_per_program = _floor_power_of_2(max(1, row_tiles // groups_wanted))
    groups = triton.cdiv(row_tiles, tiles_per_program)
    partial = torch.empty((groups, width), dtype=torch.float32, device=x2.device)
    _bias_gelu_bwd_kernel[(groups, col_blocks)](x2, bias, dy2, dx, partial, rows, width,
                                                TILES_PER_PROGRAM=tiles_per_program, BLOCK_M=block_m,
                                                BLOCK_N=block_n, num_warps=8 if block_m * block_n >= 2048 else 4)
    reduce_n = min(triton.next_power_of_2(width), 128)
    _sum_partials_kernel[(triton.cdiv(width, reduce_n),)](partial, db, groups, width,
                                                          CHUNKS=triton.cdiv(groups, 32), BLOCK_P=32,
                                                          BLOCK_N=reduce_n, num_warps=4)
    return dx, db


class _BiasGeluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        width = x.shape[-1]
        x2 = x.contiguous().view(-1, width)
        bias_c = bias.contiguous()
        ctx.save_for_backward(x2, bias_c)
        return _forward(x2, bias_c).view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, bias = ctx.saved_tensors
        dx, db = _backward(x2, bias, dy.contiguous().view(-1, x2.shape[-1]))
        return dx.view(dy.shape), db


# ============================================================================================== CUDA path
# The binding's functions (csrc/bindings/cuda_ops.cpp, bias + GELU section) as custom operators, with fakes
# giving the binding's output metadata (for tracing) and the forward's backward.
def _bias_gelu_fwd_impl(x: Tensor, bias: Tensor) -> Tensor:
    return cuda_module().bias_gelu_forward(x, bias)


def _bias_gelu_bwd_impl(x: Tensor, bias: Tensor, dy: Tensor) -> Tuple[Tensor, Tensor]:
    dx, db = cuda_module().bias_gelu_backward(x, bias, dy)
    return dx, db


bias_gelu_fwd = cuda_op("bias_gelu_fwd")(_bias_gelu_fwd_impl)
bias_gelu_bwd = cuda_op("bias_gelu_bwd")(_bias_gelu_bwd_impl)


@bias_gelu_fwd.register_fake
def _(x, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@bias_gelu_bwd.register_fake
def _(x, bias, dy):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(bias)


def _bias_gelu_setup(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _bias_gelu_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    return bias_gelu_bwd(x, bias, dy.contiguous())


bias_gelu_fwd.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup)


def _cuda_bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    return bias_gelu_fwd(x.contiguous(), bias.contiguous())
