"""Scaled dot-product attention, flash style: the T x T score matrix is never stored.

    o = attention(q, k, v, causal=True)        # q, k, v: (B, H, T, D); softmax scale 1/sqrt(D)

Forward (FlashAttention-2): one program per (query tile, batch*head) walks the key tiles with an online
softmax, keeping the running max, the running sum and the output tile in fp32 registers, and saves one
log-sum-exp per row for the backward pass. Causal: key tiles wholly above the diagonal are never visited,
and only the tiles that straddle the diagonal (or the end of the sequence) pay for a mask.

Backward (FlashAttention-2): a small kernel computes delta = rowsum(dO * O); one kernel per key tile walks
the query tiles and accumulates dK and dV; a separate kernel per query tile walks the key tiles and
accumulates dQ. Both recompute the probabilities from the saved log-sum-exp. No atomics, so the gradients
are deterministic.

q, k and v may be strided views (for example slices of a fused qkv projection): the kernels take strides,
so no copy is made as long as the head dimension is contiguous. Output and gradients are laid out like
their inputs: a (B, T, H, D)-ordered input gets a (B, T, H, D)-ordered result, so transposing it back to
(B, T, H*D) costs nothing.

This file holds all three paths, in this order: the plain-PyTorch ``attention_reference``; the dispatch
(``attention``); the Triton kernels (GPU, or CPU under TRITON_INTERPRET=1; head dims 32, 64, 128); and the CUDA
C++ kernels (csrc/kernels/attention.cu: the same algorithm on mma.m16n8k16 tensor-core instructions, sm_80 and
later, fp16/bf16, head dims 64 and 128) registered as the custom operators ``torch.ops.gpt2fast.attention_fwd``
and ``attention_bwd``.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2fast.ops import _dispatch
from gpt2fast.ops._common import cuda_module, cuda_op, device_guard, tl, triton

HEAD_DIMS = (32, 64, 128)
CUDA_HEAD_DIMS = (64, 128)
# CUDA limits the second grid dimension (batch * heads here) to 65535.
MAX_BATCH_HEADS = 65535
LOG2E = 1.4426950408889634

# Tile sizes under the interpreter, where every program runs one after another in numpy: small tiles keep
# the tests quick and make even short sequences span several tiles (and tails). Query and key tiles differ
# so that the diagonal and tail logic is exercised with unequal tiles. Tests may swap these.
INTERPRETER_BLOCKS = {
    "fwd": (32, 16),  # (BLOCK_M queries, BLOCK_N keys)
    "dkdv": (16, 32),
    "dq": (32, 16),
    "delta": 32,
}


# ---------------------------------------------------------------------------------------------- reference
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Plain PyTorch: softmax(q @ k^T / sqrt(D), masked when causal) @ v. Scores and softmax in fp32 (or in
    the input dtype when that is wider), the two matmuls in the input dtype; returns q's dtype."""
    _check_args(q, k, v)
    T, D = q.shape[-2], q.shape[-1]
    wide = torch.promote_types(q.dtype, torch.float32)
    scores = (q @ k.transpose(-2, -1)).to(wide) * (1.0 / math.sqrt(D))
    if causal:
        above_diagonal = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above_diagonal, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return (probs @ v).to(q.dtype)


# ----------------------------------------------------------------------------------------------- dispatch
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              backend: str = "auto") -> torch.Tensor:
    """softmax(q @ k^T / sqrt(D)) @ v over the last two dimensions of (B, H, T, D) tensors.

    ``causal``: query t sees keys 0..t only. Returns (B, H, T, D) in q's dtype; differentiable in q, k, v.
    ``backend``: "auto" (the faster of the CUDA and Triton kernels where one can run, else the reference with
    a one-time warning), "cuda" or "triton" (an error where it cannot run) or "torch".
    """
    _check_args(q, k, v)
    reason = _dispatch.why_not_triton((q, k, v), extra=_shape_problem(q))
    causal = bool(causal)
    B, H, T, D = q.shape
    path = _dispatch.choose("attention", backend, reason, lambda: _why_not_cuda(q, k, v), (q, k, v),
                            run=lambda p, *qkv: _run(p, *qkv, causal),
                            bucket=_dispatch.shape_bucket(B * H, T) + f"|D{D}|{'causal' if causal else 'full'}")
    return _run(path, q, k, v, causal)


def _run(path: str, q, k, v, causal: bool) -> torch.Tensor:
    if path == "torch":
        # PyTorch's own fused attention: the peer "auto" measures ours against, and the fast path on a CPU.
        # The float64 tests compare every path with attention_reference, written out in plain matmuls.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if path == "cuda":
        return _cuda_attention(q, k, v, causal)
    return _FlashAttentionFn.apply(q, k, v, causal)


def _check_args(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"attention: {name} must be a tensor of shape (B, H, T, D), got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must have 4 dimensions (B, H, T, D), got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"attention: q, k and v must have the same shape (B, H, T, D), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k and v must be on the same device, got {q.device}, {k.device}, "
                         f"{v.device}")
    if not q.is_floating_point():
        raise ValueError(f"attention: q, k and v must be floating point, got {q.dtype}")


def _shape_problem(q: torch.Tensor) -> Optional[str]:
    B, H, T, D = q.shape
    if D not in HEAD_DIMS:
        return f"head dim {D} is not supported by the Triton kernel (supported: {', '.join(map(str, HEAD_DIMS))})"
    if B * H > MAX_BATCH_HEADS:
        return f"batch * heads = {B * H} exceeds the kernel grid's limit of {MAX_BATCH_HEADS}"
    return None


def _why_not_cuda(q, k, v) -> Optional[str]:
    B, H, T, D = q.shape
    extra = None
    if D not in CUDA_HEAD_DIMS:
        extra = f"head dim {D} is not supported by the CUDA kernel (supported: {', '.join(map(str, CUDA_HEAD_DIMS))})"
    elif B * H > MAX_BATCH_HEADS:
        extra = f"batch * heads = {B * H} exceeds the kernel grid's limit of {MAX_BATCH_HEADS}"
    elif B * H * T == 0:
        extra = "the input is empty"
    elif q.is_cuda and torch.cuda.get_device_capability(q.device)[0] < 8:
        extra = "the CUDA attention kernel uses mma.m16n8k16 tensor-core instructions (sm_80 or newer)"
    return _dispatch.why_not_cuda((q, k, v), dtypes=(torch.float16, torch.bfloat16), extra=extra)


# ---------------------------------------------------------------------------------------------- layouts
def _stored_bthd(t: Tensor) -> bool:
    """Whether the (B, H, T, D) tensor ``t`` is (a view of) one stored in (B, T, H, D) order."""
    return t.shape[1] > 1 and t.shape[2] > 1 and t.stride(1) < t.stride(2)


def empty_attention_like(t: Tensor) -> Tensor:
    """An empty (B, H, T, D) tensor stored (B, T, H, D) when ``t`` is (a view of) that order, so that the
    caller's transpose back to (B, T, H*D) is free; contiguous (B, H, T, D) otherwise. Both paths lay out their
    outputs and gradients so (the binding too: csrc/bindings/cuda_ops.cpp)."""
    B, H, T, D = t.shape
    if _stored_bthd(t):
        return t.new_empty((B, T, H, D)).transpose(1, 2)
    return t.new_empty((B, H, T, D))


# ============================================================================================ Triton path
class _FlashAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal):
        o, lse = _flash_forward(q, k, v, causal)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _flash_backward(do, q, k, v, o, lse, ctx.causal)
        return dq, dk, dv, None


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels take the B, H and T strides as arguments but assume unit stride along D (vector loads).
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tf32 would lose the flash-rule comparison against torch fp32).
    # fp16/bf16: tensor cores; the setting does not apply. See _dot for "bf16-emulated".
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and _dispatch.triton_interpreting():
        return "bf16-emulated"
    return "tf32"


def _t_bucket(T: int) -> int:
    # Autotuning is keyed on the next power of two of T, so generation with a growing T tunes only a few times.
    return triton.next_power_of_2(max(T, 16))


def _flash_forward(q, k, v, causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, T, D = q.shape
    o = empty_attention_like(q)
    lse = torch.empty(B * H, T, dtype=torch.float32, device=q.device)  # base-2 log-sum-exp of scaled scores
    if o.numel() == 0:
        return o, lse
    scale_log2 = LOG2E / math.sqrt(D)
    args = (q, k, v, o, lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            H, T, _t_bucket(T), scale_log2)
    meta = dict(HEAD_DIM=D, CAUSAL=causal, DOT_PREC=_dot_precision(q.dtype))
    with device_guard(q):
        if _dispatch.triton_interpreting():
            bm, bn = INTERPRETER_BLOCKS["fwd"]
            _attn_fwd_fixed[(triton.cdiv(T, bm), B * H)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                                         INTERP_TILES=triton.cdiv(T, bn))
        else:
            grid = lambda META: (triton.cdiv(T, META["BLOCK_M"]), B * H)  # noqa: E731
            _attn_fwd_tuned[grid](*args, **meta)
    return o, lse


def _flash_backward(do, q, k, v, o, lse, causal: bool):
    do = _last_dim_contiguous(do)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, T, D = q.shape
    dq, dk, dv = empty_attention_like(q), empty_attention_like(k), empty_attention_like(v)
    if q.numel() == 0:
        return dq, dk, dv
    delta = torch.empty(B * H, T, dtype=torch.float32, device=q.device)
    scale = 1.0 / math.sqrt(D)
    interpreting = _dispatch.triton_interpreting()
    meta = dict(HEAD_DIM=D, CAUSAL=causal, DOT_PREC=_dot_precision(q.dtype))
    strides_qkv_do = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                      v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    with device_guard(q):
        block = INTERPRETER_BLOCKS["delta"] if interpreting else 128
        _attn_bwd_delta_kernel[(triton.cdiv(T, block), B * H)](
            o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
            H, T, HEAD_DIM=D, BLOCK=block, num_warps=4)

        dkdv_args = (q, k, v, do, dk, dv, lse, delta, *strides_qkv_do,
                     dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
                     H, T, _t_bucket(T), scale * LOG2E, scale)
        dq_args = (q, k, v, do, dq, lse, delta, *strides_qkv_do, dq.stride(0), dq.stride(1), dq.stride(2),
                   H, T, _t_bucket(T), scale * LOG2E, scale)
        if interpreting:
            bm, bn = INTERPRETER_BLOCKS["dkdv"]
            _attn_bwd_dkdv_fixed[(triton.cdiv(T, bn), B * H)](*dkdv_args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                                              INTERP_TILES=triton.cdiv(T, bm))
            bm, bn = INTERPRETER_BLOCKS["dq"]
            _attn_bwd_dq_fixed[(triton.cdiv(T, bm), B * H)](*dq_args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                                          INTERP_TILES=triton.cdiv(T, bn))
        else:
            _attn_bwd_dkdv_tuned[lambda META: (triton.cdiv(T, META["BLOCK_N"]), B * H)](*dkdv_args, **meta)
            _attn_bwd_dq_tuned[lambda META: (triton.cdiv(T, META["BLOCK_M"]), B * H)](*dq_args, **meta)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------ GPU configs
# (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) per kernel and family: fp16/bf16 with D <= 64, fp16/bf16
# with D = 128, and fp32 (exact fp32 products, no tensor cores: small tiles). Every entry was compiled for sm_90
# and sm_80 with ptxas and kept only if it fits in shared memory and spills no registers on sm_90 (fp32 at
# D = 128 spills in every shape tried: it is a correctness path, not a fast one). 128-row query tiles are
# the usual winners on Hopper (wgmma works on 64 rows per warpgroup); the 64-row ones suit short sequences
# and Ampere. A config that does not fit a smaller GPU is skipped by the autotuner.
_CONFIGS = {
    "fwd": {
        "16-bit": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (128, 64, 4, 4),
                   (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 4)],
        "16-bit, D=128": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3), (128, 32, 4, 4),
                          (64, 64, 4, 3), (64, 32, 4, 4)],
        "fp32": [(32, 32, 4, 2), (32, 32, 4, 3), (64, 32, 8, 2), (32, 16, 4, 2), (64, 16, 4, 2)],
    },
    # One program per key tile, holding K, V and the dK, dV accumulators, walking the query tiles.
    "dkdv": {
        "16-bit": [(32, 128, 4, 3), (32, 128, 4, 4), (32, 128, 4, 5), (64, 128, 8, 3), (32, 128, 8, 3),
                   (64, 64, 4, 3), (32, 64, 4, 4), (16, 128, 4, 4)],
        "16-bit, D=128": [(64, 128, 8, 2), (32, 128, 8, 2), (32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3),
                          (16, 64, 4, 3), (64, 64, 4, 2)],
        "fp32": [(64, 32, 4, 3), (64, 64, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2), (64, 16, 4, 2)],
    },
    # One program per query tile, holding Q, dO and the dQ accumulator, walking the key tiles.
    "dq": {
        "16-bit": [(128, 32, 4, 3), (128, 32, 4, 4), (128, 32, 4, 5), (128, 64, 8, 3), (128, 32, 8, 4),
                   (64, 64, 4, 3), (64, 32, 4, 4)],
        "16-bit, D=128": [(128, 32, 8, 3), (128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2)],
        "fp32": [(32, 32, 4, 2), (32, 32, 4, 3), (64, 32, 8, 2), (16, 32, 4, 2), (64, 16, 4, 2)],
    },
}


# GPT2FAST_AUTOTUNE=off keeps one configuration per kernel family (its first), so nothing is autotuned: for
# tests, which check correctness (each config is one compile, 1-8 s at sm_90), not speed.
AUTOTUNE_ENV = "GPT2FAST_AUTOTUNE"


def _config_family(head_dim: int, dot_prec: str) -> str:
    if dot_prec == "ieee":
        return "fp32"
    return "16-bit, D=128" if head_dim > 64 else "16-bit"


def _configs(kernel: str):
    shapes = sorted({shape for family in _CONFIGS[kernel].values() for shape in family})
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        # HEAD_DIM and DOT_PREC are launch keywords; older Triton passes only the positional arguments.
        args = {**named_args, **kwargs}
        if "HEAD_DIM" not in args or "DOT_PREC" not in args:
            return configs
        family = _CONFIGS[kernel][_config_family(args["HEAD_DIM"], args["DOT_PREC"])]
        keep = set(family[:1] if os.environ.get(AUTOTUNE_ENV) == "off" else family)
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]
    return prune


def _even_t(args) -> bool:
    return args["T"] % args["BLOCK_M"] == 0 and args["T"] % args["BLOCK_N"] == 0


_TUNE_KEY = ["T_BUCKET", "HEAD_DIM", "CAUSAL", "DOT_PREC"]


# ------------------------------------------------------------------------------------------------ kernels
if triton is not None:

    # DOT_PREC "bf16-emulated" works around two bugs of Triton 3.6's interpreter with bf16: its dot multiplies
    # bf16's raw bits as integers, and its fp32 -> bf16 cast truncates. So under the interpreter bf16 tiles are
    # multiplied in fp32 (exact all the same: the product of two bf16 values fits in fp32) and rounded to bf16
    # here, to nearest even as the GPU does. On the GPU these helpers are plain tl.dot and .to().
    @triton.jit
    def _dot(a, b, acc, DOT_PREC: tl.constexpr):
        """a @ b (+ acc), fp32 result."""
        if DOT_PREC == "bf16-emulated":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=DOT_PREC)

    @triton.jit
    def _cast(x, dtype: tl.constexpr, DOT_PREC: tl.constexpr):
        """fp32 x rounded to dtype."""
        if DOT_PREC == "bf16-emulated":
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True).to(dtype)
        return x.to(dtype)

    @triton.jit
    def _load_rows(ptrs, rows, T, EVEN_T: tl.constexpr):
        # A [rows, D] tile; rows past the end of the sequence read as zeros.
        if EVEN_T:
            return tl.load(ptrs)
        return tl.load(ptrs, mask=rows[:, None] < T, other=0.0)

    @triton.jit
    def _load_row_stat(ptrs, rows, T, fill: tl.constexpr, EVEN_T: tl.constexpr):
        if EVEN_T:
            return tl.load(ptrs)
        return tl.load(ptrs, mask=rows < T, other=fill)

    @triton.jit
    def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, start_n, rows, T, scale_log2,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_T: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
        """One key tile of the online softmax. MASKED: a tile on the diagonal or at the sequence's end, where
        some scores must be dropped; the others need no mask at all."""
        dims = tl.arange(0, HEAD_DIM)
        cols = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            k = _load_rows(k_base + cols[:, None] * stride_kt + dims[None, :], cols, T, EVEN_T)
        else:
            k = tl.load(k_base + cols[:, None] * stride_kt + dims[None, :])
        s = _dot(q, tl.trans(k), None, DOT_PREC)
        if MASKED:
            keep = cols[None, :] < T
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            s = tl.where(keep, s, float("-inf"))
        # Running max in base-2 units (scale_log2 > 0, so scaling the max is the max of the scaled); the scale
        # is applied inside the exponent, where it fuses into one multiply-add per score.
        # The first tile visited always holds key 0, which every row sees: m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * scale_log2 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = _load_rows(v_base + cols[:, None] * stride_vt + dims[None, :], cols, T, EVEN_T)
        else:
            v = tl.load(v_base + cols[:, None] * stride_vt + dims[None, :])
        acc = _dot(_cast(p, v.dtype, DOT_PREC), v, acc, DOT_PREC)
        return acc, l_i, m_new

    @triton.jit
    def _fwd_key_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi, rows, T, scale_log2,
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_T: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, INTERP_TILES: tl.constexpr):
        """The key tiles starting in [lo, hi) (lo a multiple of BLOCK_N)."""
        if INTERP_TILES > 0:
            # Triton 3.6's interpreter cannot loop to a runtime bound under NumPy >= 2.4 (int() of a
            # one-element array): walk every tile with a compile-time trip count and skip the others.
            for i in range(0, INTERP_TILES):
                if i * BLOCK_N >= lo:
                    if i * BLOCK_N < hi:
                        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                                  i * BLOCK_N, rows, T, scale_log2, MASKED, CAUSAL, EVEN_T,
                                                  HEAD_DIM, BLOCK_N, DOT_PREC)
        else:
            for start_n in range(lo, hi, BLOCK_N):
                start_n = tl.multiple_of(start_n, BLOCK_N)
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, start_n,
                                          rows, T, scale_log2, MASKED, CAUSAL, EVEN_T, HEAD_DIM, BLOCK_N, DOT_PREC)
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, O, LSE,
                         stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                         stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                         H, T, T_BUCKET, scale_log2,
                         HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                         EVEN_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         INTERP_TILES: tl.constexpr = 0):
        pid_m = tl.program_id(0)
        if CAUSAL:  # the last query tiles have the most keys: start them first
            pid_m = tl.num_programs(0) - 1 - pid_m
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh

        m0 = pid_m * BLOCK_M
        rows = m0 + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        q = _load_rows(q_base + rows[:, None] * stride_qt + dims[None, :], rows, T, EVEN_T)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if CAUSAL:
            # Key tiles ending at or before the tile's first query need no mask; the ones after that up to
            # the tile's last query straddle the diagonal; the rest are never visited.
            unmasked_end = ((m0 + 1) // BLOCK_N) * BLOCK_N
            end = tl.minimum(m0 + BLOCK_M, T)
        else:
            unmasked_end = (T // BLOCK_N) * BLOCK_N
            end = T
        acc, l_i, m_i = _fwd_key_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, 0, unmasked_end,
                                       rows, T, scale_log2, False, CAUSAL, EVEN_T, HEAD_DIM, BLOCK_N, DOT_PREC,
                                       INTERP_TILES)
        acc, l_i, m_i = _fwd_key_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, unmasked_end, end,
                                       rows, T, scale_log2, True, CAUSAL, EVEN_T, HEAD_DIM, BLOCK_N, DOT_PREC,
                                       INTERP_TILES)

        acc = acc / l_i[:, None]
        o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + dims[None, :]
        lse_ptrs = LSE + bh.to(tl.int64) * T + rows
        if EVEN_T:
            tl.store(o_ptrs, _cast(acc, O.dtype.element_ty, DOT_PREC))
            tl.store(lse_ptrs, m_i + tl.log2(l_i))
        else:
            tl.store(o_ptrs, _cast(acc, O.dtype.element_ty, DOT_PREC), mask=rows[:, None] < T)
            tl.store(lse_ptrs, m_i + tl.log2(l_i), mask=rows < T)

    @triton.jit
    def _attn_bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh,
                               stride_dot, H, T, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
        # delta_i = sum_d dO_id * O_id (= sum_j P_ij dP_ij), the softmax backward's row term.
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        dims = tl.arange(0, HEAD_DIM)
        inside = rows[:, None] < T
        o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + dims[None, :], mask=inside,
                    other=0.0)
        do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dot + dims[None, :],
                     mask=inside, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + bh.to(tl.int64) * T + rows, delta, mask=rows < T)

    @triton.jit
    def _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, cols, start_m, T,
                   scale_log2, MASKED: tl.constexpr, EVEN_T: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr):
        """One query tile's share of a key tile's dK, dV, in transposed form (keys along rows). Query rows
        past T load as q = dO = 0 with lse = +inf, so they add nothing. MASKED: the causal diagonal."""
        dims = tl.arange(0, HEAD_DIM)
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base + rows[:, None] * stride_qt + dims[None, :], rows, T, EVEN_T)
        lse = _load_row_stat(lse_base + rows, rows, T, float("inf"), EVEN_T)
        s_t = _dot(k, tl.trans(q), None, DOT_PREC)
        p_t = tl.exp2(s_t * scale_log2 - lse[None, :])
        if MASKED:  # query row >= key column
            p_t = tl.where(rows[None, :] >= cols[:, None], p_t, 0.0)
        do = _load_rows(do_base + rows[:, None] * stride_dot + dims[None, :], rows, T, EVEN_T)
        dv = _dot(_cast(p_t, do.dtype, DOT_PREC), do, dv, DOT_PREC)
        delta = _load_row_stat(delta_base + rows, rows, T, 0.0, EVEN_T)
        dp_t = _dot(v, tl.trans(do), None, DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(_cast(ds_t, q.dtype, DOT_PREC), q, dk, DOT_PREC)
        return dk, dv

    @triton.jit
    def _dkdv_query_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                          cols, lo, hi, T, scale_log2,
                          MASKED: tl.constexpr, EVEN_T: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr, INTERP_TILES: tl.constexpr):
        """The query tiles starting in [lo, hi) (lo a multiple of BLOCK_M)."""
        if INTERP_TILES > 0:  # see _fwd_key_tiles
            for i in range(0, INTERP_TILES):
                if i * BLOCK_M >= lo:
                    if i * BLOCK_M < hi:
                        dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                            stride_dot, cols, i * BLOCK_M, T, scale_log2, MASKED, EVEN_T,
                                            HEAD_DIM, BLOCK_M, DOT_PREC)
        else:
            for start_m in range(lo, hi, BLOCK_M):
                start_m = tl.multiple_of(start_m, BLOCK_M)
                dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                    cols, start_m, T, scale_log2, MASKED, EVEN_T, HEAD_DIM, BLOCK_M, DOT_PREC)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                              stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                              stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                              H, T, T_BUCKET, scale_log2, sm_scale,
                              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                              EVEN_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              INTERP_TILES: tl.constexpr = 0):
        # Program order already starts the key tiles with the most queries (the first ones) first.
        n0 = tl.program_id(0) * BLOCK_N
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + bh.to(tl.int64) * T
        delta_base = DELTA + bh.to(tl.int64) * T

        cols = n0 + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, HEAD_DIM)
        k = _load_rows(K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kt + dims[None, :], cols, T, EVEN_T)
        v = _load_rows(V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vt + dims[None, :], cols, T, EVEN_T)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        if CAUSAL:
            # Query tiles before the one holding query n0 see none of these keys; tiles from the first one
            # whose first query is >= the tile's last key see all of them; those in between need the mask.
            lo = (n0 // BLOCK_M) * BLOCK_M
            unmasked_start = tl.minimum(tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M, T)
            dk, dv = _dkdv_query_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                       cols, lo, unmasked_start, T, scale_log2, True, EVEN_T, HEAD_DIM, BLOCK_M,
                                       DOT_PREC, INTERP_TILES)
        else:
            unmasked_start = 0
        dk, dv = _dkdv_query_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                   cols, unmasked_start, T, T, scale_log2, False, EVEN_T, HEAD_DIM, BLOCK_M, DOT_PREC,
                                   INTERP_TILES)

        dk_ptrs = DK + b * stride_dkb + h * stride_dkh + cols[:, None] * stride_dkt + dims[None, :]
        dv_ptrs = DV + b * stride_dvb + h * stride_dvh + cols[:, None] * stride_dvt + dims[None, :]
        dk = dk * sm_scale
        if EVEN_T:
            tl.store(dk_ptrs, _cast(dk, DK.dtype.element_ty, DOT_PREC))
            tl.store(dv_ptrs, _cast(dv, DV.dtype.element_ty, DOT_PREC))
        else:
            tl.store(dk_ptrs, _cast(dk, DK.dtype.element_ty, DOT_PREC), mask=cols[:, None] < T)
            tl.store(dv_ptrs, _cast(dv, DV.dtype.element_ty, DOT_PREC), mask=cols[:, None] < T)

    @triton.jit
    def _dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, start_n, T, scale_log2,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_T: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
        """One key tile's share of a query tile's dQ."""
        dims = tl.arange(0, HEAD_DIM)
        cols = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            k = _load_rows(k_base + cols[:, None] * stride_kt + dims[None, :], cols, T, EVEN_T)
            v = _load_rows(v_base + cols[:, None] * stride_vt + dims[None, :], cols, T, EVEN_T)
        else:
            k = tl.load(k_base + cols[:, None] * stride_kt + dims[None, :])
            v = tl.load(v_base + cols[:, None] * stride_vt + dims[None, :])
        s = _dot(q, tl.trans(k), None, DOT_PREC)
        p = tl.exp2(s * scale_log2 - lse[:, None])
        if MASKED:
            keep = cols[None, :] < T
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            p = tl.where(keep, p, 0.0)
        dp = _dot(do, tl.trans(v), None, DOT_PREC)
        ds = p * (dp - delta[:, None])
        return _dot(_cast(ds, k.dtype, DOT_PREC), k, dq, DOT_PREC)

    @triton.jit
    def _dq_key_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, lo, hi, T, scale_log2,
                      MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_T: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, INTERP_TILES: tl.constexpr):
        """The key tiles starting in [lo, hi) (lo a multiple of BLOCK_N)."""
        if INTERP_TILES > 0:  # see _fwd_key_tiles
            for i in range(0, INTERP_TILES):
                if i * BLOCK_N >= lo:
                    if i * BLOCK_N < hi:
                        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows,
                                      i * BLOCK_N, T, scale_log2, MASKED, CAUSAL, EVEN_T, HEAD_DIM, BLOCK_N,
                                      DOT_PREC)
        else:
            for start_n in range(lo, hi, BLOCK_N):
                start_n = tl.multiple_of(start_n, BLOCK_N)
                dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, start_n, T,
                              scale_log2, MASKED, CAUSAL, EVEN_T, HEAD_DIM, BLOCK_N, DOT_PREC)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
                            stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                            stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                            stride_dqb, stride_dqh, stride_dqt,
                            H, T, T_BUCKET, scale_log2, sm_scale,
                            HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                            EVEN_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            INTERP_TILES: tl.constexpr = 0):
        pid_m = tl.program_id(0)
        if CAUSAL:
            pid_m = tl.num_programs(0) - 1 - pid_m
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        m0 = pid_m * BLOCK_M
        rows = m0 + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        q = _load_rows(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + dims[None, :], rows, T, EVEN_T)
        do = _load_rows(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dot + dims[None, :], rows, T,
                        EVEN_T)
        lse = _load_row_stat(LSE + bh.to(tl.int64) * T + rows, rows, T, float("inf"), EVEN_T)
        delta = _load_row_stat(DELTA + bh.to(tl.int64) * T + rows, rows, T, 0.0, EVEN_T)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh

        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if CAUSAL:
            unmasked_end = ((m0 + 1) // BLOCK_N) * BLOCK_N
            end = tl.minimum(m0 + BLOCK_M, T)
        else:
            unmasked_end = (T // BLOCK_N) * BLOCK_N
            end = T
        dq = _dq_key_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, 0, unmasked_end, T,
                           scale_log2, False, CAUSAL, EVEN_T, HEAD_DIM, BLOCK_N, DOT_PREC, INTERP_TILES)
        dq = _dq_key_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, unmasked_end, end, T,
                           scale_log2, True, CAUSAL, EVEN_T, HEAD_DIM, BLOCK_N, DOT_PREC, INTERP_TILES)

        dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqt + dims[None, :]
        dq = dq * sm_scale
        if EVEN_T:
            tl.store(dq_ptrs, _cast(dq, DQ.dtype.element_ty, DOT_PREC))
        else:
            tl.store(dq_ptrs, _cast(dq, DQ.dtype.element_ty, DOT_PREC), mask=rows[:, None] < T)

    # EVEN_T (T a multiple of both tiles) drops every tail mask; it follows from the chosen tiles.
    _attn_fwd_fixed = triton.heuristics({"EVEN_T": _even_t})(_attn_fwd_kernel)
    _attn_bwd_dkdv_fixed = triton.heuristics({"EVEN_T": _even_t})(_attn_bwd_dkdv_kernel)
    _attn_bwd_dq_fixed = triton.heuristics({"EVEN_T": _even_t})(_attn_bwd_dq_kernel)
    # Every kernel overwrites its outputs (no accumulation into them), so autotuning's repeated runs are safe.
    _attn_fwd_tuned = triton.autotune(configs=_configs("fwd"), key=_TUNE_KEY,
                                      prune_configs_by={"early_config_prune": _pruner("fwd")})(_attn_fwd_fixed)
    _attn_bwd_dkdv_tuned = triton.autotune(configs=_configs("dkdv"), key=_TUNE_KEY,
                                           prune_configs_by={"early_config_prune": _pruner("dkdv")})(
        _attn_bwd_dkdv_fixed)
    _attn_bwd_dq_tuned = triton.autotune(configs=_configs("dq"), key=_TUNE_KEY,
                                         prune_configs_by={"early_config_prune": _pruner("dq")})(_attn_bwd_dq_fixed)


# ============================================================================================== CUDA path
# The binding's functions (csrc/bindings/cuda_ops.cpp, attention section) as custom operators, with fakes giving
# the binding's output metadata (for tracing) and the forward's backward.
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


attention_fwd = cuda_op("attention_fwd")(_attention_fwd_impl)
attention_bwd = cuda_op("attention_bwd")(_attention_bwd_impl)


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


def _cuda_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    return attention_fwd(q, k, v, causal)[0]
