"""The CUDA C++ kernels (gpt2fast._cuda_ops) as PyTorch custom operators, ``torch.ops.gpt2fast.*``.

Registered with ``torch.library.custom_op``, each kernel is one opaque operator to autograd and to
``torch.compile``: a model on ``backend="cuda"`` traces without graph breaks (a direct call into a pybind11
function would break the graph at every op). Each operator has a fake implementation (output shapes, dtypes and
strides, the same as the binding's: see csrc/bindings/cuda_ops.cpp) for tracing, and the differentiable ones
have their backward registered. The wrappers at the bottom (``attention``, ``layer_norm``, ``bias_gelu``,
``cross_entropy``) are what the op files call for backend="cuda".

The implementations call ``cuda_module()``, the extension module found (or compiled on first use) by
gpt2fast.ops._cuda. The tests swap in a plain-PyTorch stand-in with the binding's contract to check the
registrations (schemas, fakes, autograd, tracing) on machines without a GPU.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

_MODULE_OVERRIDE = None  # tests: a stand-in for the extension module


def cuda_module():
    """The CUDA ops extension module; a RuntimeError with the reason when it is not available."""
    if _MODULE_OVERRIDE is not None:
        return _MODULE_OVERRIDE
    from gpt2fast.ops._cuda import cuda_ops_status

    status = cuda_ops_status()
    if status.module is None:
        raise RuntimeError(f"gpt2fast: the CUDA ops are not available: {status.reason}")
    return status.module


def _op(name: str):
    return torch.library.custom_op(f"gpt2fast::{name}", mutates_args=(), device_types="cuda")


# ------------------------------------------------------------------------------------------ attention
def _stored_bthd(t: Tensor) -> bool:
    """Whether the (B, H, T, D) tensor ``t`` is (a view of) one stored in (B, T, H, D) order."""
    return t.shape[1] > 1 and t.shape[2] > 1 and t.stride(1) < t.stride(2)


def empty_attention_like(t: Tensor) -> Tensor:
    """An empty (B, H, T, D) tensor stored (B, T, H, D) when ``t`` is (a view of) that order, contiguous
    (B, H, T, D) otherwise: the layout the binding gives attention outputs and gradients."""
    B, H, T, D = t.shape
    if _stored_bthd(t):
        return t.new_empty((B, T, H, D)).transpose(1, 2)
    return t.new_empty((B, H, T, D))


def attention_ready(t: Tensor) -> Tensor:
    """``t`` when the kernels can read it in place (unit stride along D, rows in 16-byte chunks: B, H, T strides
    and the storage offset multiples of 8 elements), else a packed copy."""
    if t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:3]) and t.storage_offset() % 8 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _laid_out_like(result: Tensor, like: Tensor) -> Tensor:
    """``result`` in the layout ``empty_attention_like(like)`` promises (the fake's), copied if a packed input
    gave it another one."""
    if _stored_bthd(result) == _stored_bthd(like):  # the usual case: no allocation, no copy
        return result
    return empty_attention_like(like).copy_(result)


# The readiness checks and copies happen inside the operators, where torch.compile does not trace them (it
# cannot trace storage_offset()); the outputs keep the layout of the caller's tensors either way.
def _attention_fwd_impl(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tuple[Tensor, Tensor]:
    o, lse = cuda_module().attention_forward(attention_ready(q), attention_ready(k), attention_ready(v), causal)
    return _laid_out_like(o, q), lse


def _attention_bwd_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                        causal: bool) -> Tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = cuda_module().attention_backward(*(attention_ready(t) for t in (do, q, k, v, o)), lse, causal)
    return _laid_out_like(dq, q), _laid_out_like(dk, k), _laid_out_like(dv, v)


attention_fwd = _op("attention_fwd")(_attention_fwd_impl)
attention_bwd = _op("attention_bwd")(_attention_bwd_impl)


@attention_fwd.register_fake
def _(q, k, v, causal):
    return empty_attention_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@attention_bwd.register_fake
def _(do, q, k, v, o, lse, causal):
    return empty_attention_like(q), empty_attention_like(k), empty_attention_like(v)


def _attention_setup(ctx, inputs, output):
    q, k, v, causal = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal = causal


def _attention_backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(do, q, k, v, o, lse, ctx.causal)
    return dq, dk, dv, None


attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


# ------------------------------------------------------------------------------------------ LayerNorm
def _rows_of(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


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


layer_norm_fwd = _op("layer_norm_fwd")(_layer_norm_fwd_impl)
add_layer_norm_fwd = _op("add_layer_norm_fwd")(_add_layer_norm_fwd_impl)
layer_norm_bwd = _op("layer_norm_bwd")(_layer_norm_bwd_impl)


def _stats_like(x: Tensor) -> Tensor:
    return x.new_empty((_rows_of(x),), dtype=torch.float32)


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


# ------------------------------------------------------------------------------------------ bias + GELU
def _bias_gelu_fwd_impl(x: Tensor, bias: Tensor) -> Tensor:
    return cuda_module().bias_gelu_forward(x, bias)


def _bias_gelu_bwd_impl(x: Tensor, bias: Tensor, dy: Tensor) -> Tuple[Tensor, Tensor]:
    dx, db = cuda_module().bias_gelu_backward(x, bias, dy)
    return dx, db


bias_gelu_fwd = _op("bias_gelu_fwd")(_bias_gelu_fwd_impl)
bias_gelu_bwd = _op("bias_gelu_bwd")(_bias_gelu_bwd_impl)


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


# ------------------------------------------------------------------------------------------ cross-entropy
def grad_like(x: Tensor) -> Tensor:
    """An empty (rows, classes) tensor with x's row stride: the layout of the binding's gradient."""
    if x.shape[0] <= 1 or x.stride(0) == x.shape[1]:
        return x.new_empty(x.shape)
    return x.new_empty_strided(x.shape, (x.stride(0), 1))


def _cross_entropy_mean_impl(logits: Tensor, targets: Tensor, ignore_index: int) -> Tuple[Tensor, Tensor, Tensor]:
    loss_rows, lse = cuda_module().cross_entropy_forward(logits, targets, ignore_index)
    n_valid = (targets != ignore_index).sum(dtype=torch.float32)
    return loss_rows.sum() / n_valid, lse, n_valid  # 0/0 = nan when every row is ignored, as in PyTorch


def _cross_entropy_rows_impl(logits: Tensor, targets: Tensor, ignore_index: int) -> Tuple[Tensor, Tensor]:
    loss_rows, lse = cuda_module().cross_entropy_forward(logits, targets, ignore_index)
    return loss_rows, lse


def _cross_entropy_grad_impl(logits: Tensor, targets: Tensor, lse: Tensor, scale: Tensor,
                             ignore_index: int) -> Tensor:
    return cuda_module().cross_entropy_backward(logits, targets, lse, scale, ignore_index)


def _cross_entropy_grad_inplace_impl(logits: Tensor, targets: Tensor, lse: Tensor, scale: Tensor,
                                     ignore_index: int) -> None:
    cuda_module().cross_entropy_backward(logits, targets, lse, scale, ignore_index, logits)


cross_entropy_mean = _op("cross_entropy_mean")(_cross_entropy_mean_impl)
cross_entropy_rows = _op("cross_entropy_rows")(_cross_entropy_rows_impl)
cross_entropy_grad = _op("cross_entropy_grad")(_cross_entropy_grad_impl)
cross_entropy_grad_ = torch.library.custom_op("gpt2fast::cross_entropy_grad_", mutates_args=("logits",),
                                              device_types="cuda")(_cross_entropy_grad_inplace_impl)


@cross_entropy_mean.register_fake
def _(logits, targets, ignore_index):
    scalar = logits.new_empty((), dtype=torch.float32)
    return scalar, logits.new_empty((logits.shape[0],), dtype=torch.float32), torch.empty_like(scalar)


@cross_entropy_rows.register_fake
def _(logits, targets, ignore_index):
    rows = logits.new_empty((logits.shape[0],), dtype=torch.float32)
    return rows, torch.empty_like(rows)


@cross_entropy_grad.register_fake
def _(logits, targets, lse, scale, ignore_index):
    return grad_like(logits)


@cross_entropy_grad_.register_fake
def _(logits, targets, lse, scale, ignore_index):
    return None


def _cross_entropy_setup(ctx, inputs, output):
    logits, targets, ignore_index = inputs
    _loss, lse, n_valid = output
    ctx.save_for_backward(logits, targets, lse, n_valid)
    ctx.ignore_index = ignore_index


def _cross_entropy_backward(ctx, dloss, _dlse, _dn):
    logits, targets, lse, n_valid = ctx.saved_tensors
    scale = (dloss.float() / n_valid).reshape(1)
    return cross_entropy_grad(logits, targets, lse, scale, ctx.ignore_index), None, None


cross_entropy_mean.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup)


# ------------------------------------------------------------------------------------------ entry points
def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    return attention_fwd(q, k, v, causal)[0]


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], eps: float):
    """y, or (y, h) with a residual, as gpt2fast.ops.layer_norm returns them (h in x's dtype)."""
    weight, bias = weight.contiguous(), bias.contiguous()
    if residual is None:
        return layer_norm_fwd(x.contiguous(), weight, bias, eps)[0]
    if residual.dtype != x.dtype:
        # The kernel adds two tensors of one dtype. Under autocast the stream arrives in fp32 beside a bf16
        # sublayer output; h is x's dtype anyway, and autograd carries dresidual back through the cast.
        residual = residual.to(x.dtype)
    y, h, _, _ = add_layer_norm_fwd(x.contiguous(), weight, bias, residual.contiguous(), eps)
    return y, h


def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    return bias_gelu_fwd(x.contiguous(), bias.contiguous())


def cross_entropy(logits2d: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    return cross_entropy_mean(logits2d, targets, ignore_index)[0]
