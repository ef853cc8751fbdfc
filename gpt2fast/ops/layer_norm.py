"""LayerNorm over the last dimension, with the residual add fused in.

    y = layer_norm(x, weight, bias)                    # y = LN(x)
    y, h = layer_norm(x, weight, bias, residual=r)     # h = x + r (the new residual stream), y = LN(h)

One read of x and r and one write of y and h, instead of the three passes of ``h = x + r`` followed by
``F.layer_norm(h)``. Statistics are computed in fp32; mean and 1/std are kept for the backward pass, which
re-reads h (or x) rather than a normalised copy.

Backward fuses three things: the LayerNorm input gradient, the gradient arriving at h from downstream (the
residual stream) added onto it, and per-program partial sums of dweight and dbias that a second kernel adds
up in a fixed order, so the parameter gradients are deterministic (no atomics).

This file holds all three paths, in this order: the plain-PyTorch ``layer_norm_reference``; the dispatch
(``layer_norm``); the Triton kernels (GPU, or CPU under TRITON_INTERPRET=1); and the CUDA C++ kernels
(csrc/kernels/layer_norm.cu) registered as the custom operators ``torch.ops.gpt2fast.layer_norm_fwd``,
``add_layer_norm_fwd`` and ``layer_norm_bwd``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2fast.ops import _common, _dispatch
from gpt2fast.ops._common import cuda_module, cuda_op, tl, triton

# A row lives in registers as one power-of-two block. Compiled for sm_90, the backward kernel (which also
# carries weight, dweight and dbias rows) starts spilling past 8192 columns and spills kilobytes per thread
# past 16384, where PyTorch's own kernel is the better choice: wider rows fall back.
MAX_WIDTH = 16384

Output = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------------------------- reference
def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         residual: Optional[torch.Tensor] = None, eps: float = 1e-5) -> Output:
    """Plain PyTorch: ``F.layer_norm(x + residual)``; returns y, or (y, h) when a residual is given."""
    _check_args(x, weight, bias, residual)
    if residual is None:
        return F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), bias.to(x.dtype), eps)
    h = (x + residual).to(x.dtype)
    return F.layer_norm(h, (h.shape[-1],), weight.to(h.dtype), bias.to(h.dtype), eps), h


# ----------------------------------------------------------------------------------------------- dispatch
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor] = None,
               eps: float = 1e-5, backend: str = "auto") -> Output:
    """LayerNorm of ``x`` (or of ``h = x + residual``) over the last dimension.

    Returns y when ``residual`` is None, else (y, h); both in x's dtype. Differentiable in x, residual,
    weight and bias. ``backend``: "auto" (the faster of the CUDA and Triton kernels where one can run, else
    the reference with a one-time warning), "cuda" or "triton" (an error where it cannot run) or "torch".
    """
    _check_args(x, weight, bias, residual)
    tensors = [x, weight, bias] + ([residual] if residual is not None else [])
    reason = _dispatch.why_not_triton(tensors, extra=_shape_problem(x))
    eps = float(eps)
    path = _dispatch.choose("layer_norm", backend, reason, lambda: _why_not_cuda(tensors, x, weight, bias), tensors,
                            run=lambda p, x, w, b, *r: _run(p, x, w, b, r[0] if r else None, eps),
                            bucket=_dispatch.shape_bucket(x.numel() // max(1, x.shape[-1]), x.shape[-1])
                            + ("|residual" if residual is not None else ""))
    return _run(path, x, weight, bias, residual, eps)


def _run(path: str, x, weight, bias, residual, eps: float) -> Output:
    if path == "torch":
        return layer_norm_reference(x, weight, bias, residual, eps)
    if path == "cuda":
        return _cuda_layer_norm(x, weight, bias, residual, eps)
    return _LayerNormFn.apply(x, weight, bias, residual, eps)


def _check_args(x, weight, bias, residual) -> None:
    if x.dim() < 1:
        raise ValueError("layer_norm: x must have at least one dimension (the one normalised over), got a scalar")
    width = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"layer_norm: {name} must be a tensor of shape ({width},), got {type(p).__name__}")
        if tuple(p.shape) != (width,):
            raise ValueError(f"layer_norm: {name} has shape {tuple(p.shape)} but x has shape {tuple(x.shape)}; "
                             f"{name} must have shape ({width},) (x's last dimension)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"layer_norm: residual has shape {tuple(residual.shape)} but x has shape "
                         f"{tuple(x.shape)}; they must be equal")


def _shape_problem(x: torch.Tensor) -> Optional[str]:
    width = x.shape[-1]
    if width == 0:
        return "the rows are empty (last dimension 0)"
    if width > MAX_WIDTH:
        return f"the width {width} exceeds the Triton kernel's limit of {MAX_WIDTH} (one row per block)"
    return None


def _why_not_cuda(tensors, x, weight, bias) -> Optional[str]:
    extra = None
    if x.shape[-1] == 0:
        extra = "the rows are empty (last dimension 0)"
    elif weight.dtype != bias.dtype or weight.dtype not in (x.dtype, torch.float32):
        extra = (f"the CUDA kernel takes weight and bias of x's dtype or float32, got {weight.dtype} and "
                 f"{bias.dtype} for x of {x.dtype}")
    reason = _dispatch.why_not_cuda(tensors, extra=extra)
    if reason is None:
        limit = cuda_module().layer_norm_max_width()
        if x.shape[-1] > limit:
            reason = f"the width {x.shape[-1]} exceeds the CUDA kernel's limit of {limit}"
    return reason


# ============================================================================================ Triton path
def _num_warps(block: int) -> int:
    # At most about sixteen values of a row per thread: GPT-2 small's 768 (block 1024) gets four warps,
    # XL's 1600 (block 2048) eight.
    return 32 if block >= 16384 else 16 if block >= 8192 else 8 if block >= 2048 else 4


def _backward_programs(rows: int, device: torch.device) -> int:
    """Programs of the backward kernel, each owning a contiguous run of rows and one partial-sum row: a few per
    SM (``programs_target``), while the partial sums (programs x width, fp32) stay a small share of the traffic."""
    return max(1, min(rows, _common.programs_target(device)))


# ------------------------------------------------------------------------------------------------ kernels
if triton is not None:

    @triton.jit
    def _ln_fwd_kernel(X, R, W, B, Y, H, MEAN, RSTD, width, eps,
                       HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        # One row per program; the row stays in registers between the statistics and the output.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        offs = row * width + cols
        h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
            # Normalise h as stored (rounded to the output dtype), so the backward pass, which re-reads the
            # stored h, differentiates exactly the function computed here.
            h_out = h.to(H.dtype.element_ty)
            tl.store(H + offs, h_out, mask=mask)
            h = h_out.to(tl.float32)
        mean = tl.sum(h, axis=0) / width
        centred = tl.where(mask, h - mean, 0.0)
        var = tl.sum(centred * centred, axis=0) / width
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        y = centred * rstd * w + b
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _ln_bwd_kernel(H, DY, DH, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, rows, width,
                       ROWS_PER_PROGRAM: tl.constexpr, HAS_DH: tl.constexpr, BLOCK: tl.constexpr):
        # Program p owns rows [p * rows_per_program, ...) and writes one row of dweight / dbias partial sums.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK], dtype=tl.float32)
        first = pid.to(tl.int64) * ROWS_PER_PROGRAM
        # A compile-time trip count (a power of two, so few variants get compiled): Triton 3.6's interpreter
        # cannot loop to a runtime bound under NumPy 2. The last program masks off the rows past the end.
        for i in range(0, ROWS_PER_PROGRAM):
            row = first + i
            in_range = row < rows
            row_mask = mask & in_range
            offs = row * width + cols
            h = tl.load(H + offs, mask=row_mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=row_mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + row, mask=in_range, other=0.0)
            rstd = tl.load(RSTD + row, mask=in_range, other=0.0)
            xhat = tl.where(row_mask, (h - mean) * rstd, 0.0)
            wdy = w * dy
            # dx = rstd * (w*dy - mean(w*dy) - xhat * mean(xhat * w*dy))
            c_xhat = tl.sum(xhat * wdy, axis=0) / width
            c_mean = tl.sum(wdy, axis=0) / width
            dx = (wdy - (xhat * c_xhat + c_mean)) * rstd
            if HAS_DH:  # gradient reaching the residual stream h from downstream
                dx += tl.load(DH + offs, mask=row_mask, other=0.0).to(tl.float32)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=row_mask)
            dw_acc += dy * xhat
            db_acc += dy
        tl.store(DW_PARTIAL + pid * width + cols, dw_acc, mask=mask)
        tl.store(DB_PARTIAL + pid * width + cols, db_acc, mask=mask)

    @triton.jit
    def _sum_partials_kernel(DW_PARTIAL, DB_PARTIAL, DW, DB, programs, width,
                             CHUNKS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        # Column sums of the (programs, width) partials, always added in the same order: deterministic.
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < width
        dw = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
        for chunk in range(0, CHUNKS):  # CHUNKS = cdiv(programs, BLOCK_P): compile-time, as above
            prog = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
            mask = (prog[:, None] < programs) & col_mask[None, :]
            offs = prog[:, None] * width + cols[None, :]
            dw += tl.load(DW_PARTIAL + offs, mask=mask, other=0.0)
            db += tl.load(DB_PARTIAL + offs, mask=mask, other=0.0)
        tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=col_mask)
        tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=col_mask)


def _forward(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, r2: Optional[torch.Tensor], eps: float):
    rows, width = x2.shape
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if r2 is not None else None
    mean = torch.empty(rows, dtype=torch.float32, device=x2.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x2.device)
    if rows:
        block = triton.next_power_of_2(width)
        _ln_fwd_kernel[(rows,)](x2, r2 if r2 is not None else x2, weight, bias, y, h if h is not None else y,
                                mean, rstd, width, eps, HAS_RESIDUAL=r2 is not None, BLOCK=block,
                                num_warps=_num_warps(block))
    return y, h, mean, rstd


def _backward(h2, dy2, dh2, weight, bias, mean, rstd, dx_dtype):
    rows, width = h2.shape
    dx = torch.empty((rows, width), dtype=dx_dtype, device=h2.device)
    dw = torch.empty_like(weight)
    db = torch.empty_like(bias)
    if rows == 0:
        return dx, dw.zero_(), db.zero_()
    block = triton.next_power_of_2(width)
    # A power of two rows per program (it is compile-time, see the kernel), at most rows / target programs.
    rows_per_program = 1 << (max(1, rows // _backward_programs(rows, h2.device)).bit_length() - 1)
    programs = triton.cdiv(rows, rows_per_program)
    dw_partial = torch.empty((programs, width), dtype=torch.float32, device=h2.device)
    db_partial = torch.empty((programs, width), dtype=torch.float32, device=h2.device)
    _ln_bwd_kernel[(programs,)](h2, dy2, dh2 if dh2 is not None else dy2, weight, mean, rstd, dx,
                                dw_partial, db_partial, rows, width, ROWS_PER_PROGRAM=rows_per_program,
                                HAS_DH=dh2 is not None, BLOCK=block, num_warps=_num_warps(block))
    block_n = min(block, 128)
    _sum_partials_kernel[(triton.cdiv(width, block_n),)](dw_partial, db_partial, dw, db, programs, width,
                                                         CHUNKS=triton.cdiv(programs, 32), BLOCK_P=32,
                                                         BLOCK_N=block_n, num_warps=4)
    return dx, dw, db


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps):
        shape, width = x.shape, x.shape[-1]
        x2 = x.contiguous().view(-1, width)
        r2 = residual.contiguous().view(-1, width) if residual is not None else None
        weight_c, bias_c = weight.contiguous(), bias.contiguous()
        y, h, mean, rstd = _forward(x2, weight_c, bias_c, r2, eps)
        # Backward needs the normalised input: h when the residual was added, x itself otherwise.
        ctx.save_for_backward(h if h is not None else x2, weight_c, bias_c, mean, rstd)
        ctx.has_residual = residual is not None
        ctx.residual_dtype = residual.dtype if residual is not None else None
        ctx.set_materialize_grads(False)
        if h is None:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        h2, weight, bias, mean, rstd = ctx.saved_tensors
        width = h2.shape[-1]
        if dy is None:  # only h was used downstream: y contributes nothing, so dL/dh passes straight through
            return dh, None, None, dh if dh.dtype == ctx.residual_dtype else dh.to(ctx.residual_dtype), None
        shape = dy.shape
        dy2 = dy.contiguous().view(-1, width)
        dh2 = dh.contiguous().view(-1, width) if dh is not None else None
        dx, dw, db = _backward(h2, dy2, dh2, weight, bias, mean, rstd, h2.dtype)
        dx = dx.view(shape)
        dres = None
        if ctx.has_residual:  # h = x + residual: both receive dL/dh
            dres = dx if ctx.residual_dtype == dx.dtype else dx.to(ctx.residual_dtype)
        return dx, dw, db, dres, None


# ============================================================================================== CUDA path
# The binding's functions (csrc/bindings/cuda_ops.cpp, LayerNorm section) as custom operators, each with a fake
# giving the binding's output metadata (for tracing) and, for the forward ones, its backward.
def _layer_norm_fwd_impl(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    y, _, mean, rstd = cuda_module().layer_norm_forward(x, weight, bias, None, eps)
    return y, mean, rstd


def _add_layer_norm_fwd_impl(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor,
                             eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    y, h, mean, rstd = cuda_module().layer_norm_forward(x, weight, bias, residual, eps)
    return y, h, mean, rstd


def _layer_norm_bwd_impl(h: Tensor, dy: Tensor, dh: Optional[Tensor], weight: Tensor, mean: Tensor,
                         rstd: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = cuda_module().layer_norm_backward(h, dy, dh, weight, mean, rstd)
    return dx, dw, db


layer_norm_fwd = cuda_op("layer_norm_fwd")(_layer_norm_fwd_impl)
add_layer_norm_fwd = cuda_op("add_layer_norm_fwd")(_add_layer_norm_fwd_impl)
layer_norm_bwd = cuda_op("layer_norm_bwd")(_layer_norm_bwd_impl)


def _stats_like(x: Tensor) -> Tensor:
    """One fp32 value per row (mean or rstd), as the binding returns them."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty((rows,), dtype=torch.float32)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _stats_like(x), _stats_like(x)


@add_layer_norm_fwd.register_fake
def _(x, weight, bias, residual, eps):
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, torch.empty_like(y), _stats_like(x), _stats_like(x)


@layer_norm_bwd.register_fake
def _(h, dy, dh, weight, mean, rstd):
    return torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(weight), \
        torch.empty_like(weight)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, _bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = layer_norm_bwd(x, dy.contiguous(), None, weight, mean, rstd)
    return dx, dw, db, None


def _add_layer_norm_setup(ctx, inputs, output):
    _x, weight, _bias, _residual, _eps = inputs
    _y, h, mean, rstd = output
    ctx.save_for_backward(h, weight, mean, rstd)


def _add_layer_norm_backward(ctx, dy, dh, _dmean, _drstd):
    # h = x + residual, y = LN(h): x and the residual both receive dL/dh = LN'(dy) + dh.
    h, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = layer_norm_bwd(h, dy.contiguous(), dh.contiguous(), weight, mean, rstd)
    return dx, dw, db, dx, None


layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)
add_layer_norm_fwd.register_autograd(_add_layer_norm_backward, setup_context=_add_layer_norm_setup)


def _cuda_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], eps: float) -> Output:
    """y, or (y, h) with a residual, as ``layer_norm`` returns them (h in x's dtype), through the operators."""
    weight, bias = weight.contiguous(), bias.contiguous()
    if residual is None:
        return layer_norm_fwd(x.contiguous(), weight, bias, eps)[0]
    if residual.dtype != x.dtype:
        # The kernel adds two tensors of one dtype. Under autocast the stream arrives in fp32 beside a bf16
        # sublayer output; h is x's dtype anyway, and autograd carries dresidual back through the cast.
        residual = residual.to(x.dtype)
    y, h, _, _ = add_layer_norm_fwd(x.contiguous(), weight, bias, residual.contiguous(), eps)
    return y, h
