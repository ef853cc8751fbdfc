"""Cross-entropy over the last dimension, fused, with no fp32 copy of the logits; and the linear + cross-entropy
that never materialises the logits at all.

    loss = cross_entropy(logits, targets)                 # logits (..., V) in any float dtype, targets (...)
    loss = linear_cross_entropy(hidden, weight, targets)  # loss of hidden @ weight.T, computed in row chunks

Both return the mean loss over the rows whose target is not ``ignore_index``, as an fp32 scalar (the loss of
``F.cross_entropy(logits.float(), targets)``, the stock way; fp64 for fp64 inputs, which take the torch path).
With every target ignored the mean is 0/0 = nan, as in PyTorch (``reduction="mean"``), and the gradient is zero.

cross_entropy, Triton path: two streaming kernels, one program per row.
  forward   reads the row once in its own dtype, in blocks, keeping a running max and sum of exponentials in
            fp32 (one exp per element, rescaled per block); writes loss_i = lse_i - x[i, target_i] and lse_i.
  backward  re-reads the row and writes (softmax - onehot) * grad / n_valid in the logits' dtype; ignored rows
            get zeros. Nothing the size of the logits is kept between the passes: just lse (4 bytes a row).
Traffic: one read forward, one read and one write backward, 3 x 1.65 GB for GPT-2's 16384 x 50257 bf16.
(Liger computes the gradient inside the forward pass and writes it over the caller's logits: that saves the
gradient's memory, not traffic, since each row is still read twice, and it destroys the logits, which we do
not do.) Logits may have a row stride: ``padded[..., :50257]`` of an (N, 50304) tensor runs without a copy,
and its gradient gets the same row stride.

linear_cross_entropy: rows are processed in chunks; for each, the chunk's logits come from a torch matmul in
the input dtype, the loss and d_logits come from the kernels above (d_logits written over the chunk's own
logits, which nobody else sees), and grad_hidden (the chunk's rows) and grad_weight (an fp32 sum over chunks)
are accumulated right away, during the forward pass. The backward pass only scales them by the incoming
gradient. Peak extra memory: one chunk of logits plus the gradients themselves, instead of (N, V) logits, their
fp32 copy and their gradient. See ``default_chunk_size`` for the chunk (2048 rows for GPT-2 small).

Targets are checked on the host (one small reduction and one device sync per call): a target outside
[0, V) that is not ``ignore_index`` is a ValueError naming the value and its position. ``validate=False``
skips the check (no sync); the kernels then never read out of bounds, and such a row's loss and gradient are
nan, so a bad target still shows. (The torch path has no such guard: F.cross_entropy raises, or on CUDA
trips a device-side assert.)

This file holds all three paths, in this order: the plain-PyTorch references; the dispatch; the Triton kernels;
the autograd functions (linear_cross_entropy's runs any of the three per chunk); and the CUDA C++ kernels
(csrc/kernels/cross_entropy.cu) registered as the custom operators ``torch.ops.gpt2fast.cross_entropy_mean``,
``cross_entropy_rows``, ``cross_entropy_grad`` and ``cross_entropy_grad_``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2fast.ops import _dispatch
from gpt2fast.ops._common import cuda_module, cuda_op, tl, triton

__all__ = ["cross_entropy", "cross_entropy_reference", "default_chunk_size", "linear_cross_entropy",
           "linear_cross_entropy_reference"]

# Widest block of a row a program holds at once. Forward reduces each block twice (max, sum), so wider blocks
# mean fewer cross-warp reductions; backward is a plain stream. Elements per thread: block / (32 * warps).
FORWARD_MAX_BLOCK = 8192
BACKWARD_MAX_BLOCK = 4096

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------- references
def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The stock way: ``F.cross_entropy(logits.float(), targets)`` over (..., V) logits and (...) targets.

    fp16/bf16 logits are upcast to fp32 (a full fp32 copy); fp32 and fp64 stay as they are."""
    _check_shapes("cross_entropy_reference", logits, targets)
    n_classes = logits.shape[-1]
    x = logits.reshape(-1, n_classes)
    if x.dtype in _LOW_PRECISION:
        x = x.float()
    return F.cross_entropy(x, targets.reshape(-1), ignore_index=ignore_index)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100) -> torch.Tensor:
    """The stock way: materialise ``hidden @ weight.T`` (in the input dtype), then ``cross_entropy_reference``."""
    _check_linear_shapes("linear_cross_entropy_reference", hidden, weight, targets)
    return cross_entropy_reference(hidden @ weight.T, targets, ignore_index)


# ----------------------------------------------------------------------------------------------- dispatch
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, backend: str = "auto",
                  *, validate: bool = True) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (..., V) against class indices ``targets`` (...), as an fp32 scalar.

    The class dimension is the last one (the model's layout; F.cross_entropy wants it second for >2-D input).
    Rows whose target equals ``ignore_index`` count neither in the sum nor in the mean; all ignored gives nan,
    like PyTorch. Differentiable in ``logits``; the gradient has the logits' dtype. ``backend``: "auto"
    (Triton where it can run, else ``cross_entropy_reference`` with a one-time warning), "triton" (an error
    where it cannot run) or "torch". ``validate=False`` skips the target range check and its device sync.
    """
    _check_shapes("cross_entropy", logits, targets)
    n_classes = logits.shape[-1]
    if validate:
        _check_targets("cross_entropy", targets, n_classes, ignore_index)
    reason = _dispatch.why_not_triton([logits, targets], extra=_shape_problem(n_classes))
    ignore_index = int(ignore_index)
    path = _dispatch.choose("cross_entropy", backend, reason,
                            lambda: _dispatch.why_not_cuda([logits, targets], extra=_shape_problem(n_classes)),
                            (logits, targets), run=lambda p, x, t: _run_cross_entropy(p, x, t, ignore_index),
                            bucket=_dispatch.shape_bucket(targets.numel(), n_classes))
    return _run_cross_entropy(path, logits, targets, ignore_index)


def _run_cross_entropy(path: str, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    n_classes = logits.shape[-1]
    if path == "torch":
        return cross_entropy_reference(logits, targets, ignore_index)
    # A view whenever the leading dimensions merge (a last-dimension slice of a padded tensor does): the
    # kernels take the row stride, so no copy is made.
    x = logits.reshape(-1, n_classes)
    if x.stride(-1) != 1 or (x.shape[0] > 1 and x.stride(0) < n_classes):  # columns strided, or rows overlap
        x = x.contiguous()
    t = targets.reshape(-1)
    if t.dtype != torch.int64:
        t = t.to(torch.int64)
    if path == "cuda":
        return _cuda_cross_entropy(x, t, ignore_index)
    return _CrossEntropyFn.apply(x, t, ignore_index)


CPU_CHUNK_BYTES = 1 << 30


def default_chunk_size(n_rows: int, n_classes: int, hidden_size: int, device_type: str = "cuda") -> int:
    """Rows per chunk of ``linear_cross_entropy``: a chunk's logits about as big as the larger of ``hidden``
    and the fp32 grad_weight accumulator, rounded up to a power of two and capped at n_rows.

    Hidden-sized chunks (``ceil(n_rows / ceil(V / C))`` rows) bound the memory, but every chunk also reads and
    writes the whole (V, C) fp32 grad_weight accumulator (8 V C bytes, 309 MB for GPT-2 small): at 256-row
    chunks that is 64 x 309 MB, more traffic than the matmuls' own time. A chunk at least 2 C rows long makes
    its logits (2 bytes x rows x V) at least as big as the accumulator, so the accumulation costs no more than
    the chunk's own work. GPT-2 small (V 50257, C 768) with 16384 rows: 2048-row chunks, 8 of them, 206 MB of
    bf16 logits each, against 1.65 GB for all the logits (and 3.3 GB more for their fp32 copy, the stock way)."""
    n_chunks = max(1, math.ceil(n_classes / max(1, hidden_size)))
    rows = max(1, math.ceil(n_rows / n_chunks), 2 * hidden_size)
    if device_type == "cpu":
        # Host memory is plentiful and there is no launch to amortise, but every extra chunk re-reads the
        # weight and the grad_weight accumulator: one chunk, as the stock way holds all the logits, up to
        # CPU_CHUNK_BYTES of fp32 logits.
        rows = max(rows, CPU_CHUNK_BYTES // (4 * max(1, n_classes)))
    return max(1, min(n_rows, 1 << (rows - 1).bit_length()))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_size: Optional[int] = None, backend: str = "auto",
                         *, validate: bool = True) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, never holding all the logits.

    hidden (..., C), weight (V, C) of the same dtype, targets (...). Returns an fp32 scalar, the mean over the
    rows not equal to ``ignore_index`` (nan if none). Differentiable in hidden and weight: their gradients are
    computed chunk by chunk during this call (when grad mode is on and either requires grad) and only scaled
    in the backward pass. ``chunk_size``: rows per chunk, default ``default_chunk_size``. ``backend``: where
    the per-chunk softmax runs, "cuda" or "triton" kernels or plain "torch" (the matmuls are torch either
    way); "auto" as in ``cross_entropy``. Under ``torch.autocast``, hidden and weight are first cast to the
    autocast dtype, as ``F.linear`` would cast them.
    """
    if isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype) if isinstance(weight, torch.Tensor) else weight
    _check_linear_shapes("linear_cross_entropy", hidden, weight, targets)
    n_classes, width = weight.shape
    if validate:
        _check_targets("linear_cross_entropy", targets, n_classes, ignore_index)
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"linear_cross_entropy: chunk_size must be a positive integer, got {chunk_size!r}")
    reason = _dispatch.why_not_triton([hidden, weight, targets], extra=_shape_problem(n_classes))
    ignore_index = int(ignore_index)
    chunk = int(chunk_size) if chunk_size is not None else \
        default_chunk_size(targets.numel(), n_classes, width, hidden.device.type)
    path = _dispatch.choose("linear_cross_entropy", backend, reason,
                            lambda: _dispatch.why_not_cuda([hidden, weight, targets], extra=_shape_problem(n_classes)),
                            (hidden, weight, targets),
                            run=lambda p, h, w, t: _run_linear_cross_entropy(p, h, w, t, ignore_index, chunk),
                            bucket=_dispatch.shape_bucket(targets.numel(), n_classes, width) + f"|chunk{chunk}")
    return _run_linear_cross_entropy(path, hidden, weight, targets, ignore_index, chunk)


def _run_linear_cross_entropy(path: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              ignore_index: int, chunk: int) -> torch.Tensor:
    h = hidden.reshape(-1, weight.shape[1])
    t = targets.reshape(-1)
    if t.dtype != torch.int64:
        t = t.to(torch.int64)
    want_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropyFn.apply(h, weight, t, ignore_index, chunk, path, want_grads)


# ----------------------------------------------------------------------------------------------- checks
def _check_shapes(op: str, logits, targets) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise ValueError(f"{op}: logits and targets must be tensors, got {type(logits).__name__} and "
                         f"{type(targets).__name__}")
    if logits.dim() < 1:
        raise ValueError(f"{op}: logits must have at least one dimension (the classes, last), got a scalar")
    if not logits.is_floating_point():
        raise ValueError(f"{op}: logits must be floating point, got {logits.dtype}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{op}: targets have shape {tuple(targets.shape)} but logits have shape "
                         f"{tuple(logits.shape)}; targets must have shape {tuple(logits.shape[:-1])} "
                         f"(the logits' shape without the last, class dimension)")
    _check_target_dtype(op, targets)
    if logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits have no classes (last dimension 0)")


def _check_linear_shapes(op: str, hidden, weight, targets) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"{op}: hidden must be (..., C) and weight (V, C), got shapes {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"{op}: hidden and weight must be floating point of the same dtype, got {hidden.dtype} "
                         f"and {weight.dtype}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: hidden has shape {tuple(hidden.shape)} and weight {tuple(weight.shape)}; "
                         f"hidden's last dimension must equal weight's second (C)")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{op}: targets have shape {tuple(targets.shape)} but hidden has shape "
                         f"{tuple(hidden.shape)}; targets must have shape {tuple(hidden.shape[:-1])}")
    _check_target_dtype(op, targets)
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight has no rows (no classes)")


def _check_target_dtype(op: str, targets: torch.Tensor) -> None:
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"{op}: targets must be integer class indices, got {targets.dtype} "
                         f"(class probabilities are not supported)")


def _check_targets(op: str, targets: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """ValueError on the first target outside [0, n_classes) that is not ignore_index. One device sync."""
    if targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= n_classes))
    if not bool(bad.any()):
        return
    first = int(bad.reshape(-1).nonzero()[0, 0])
    value = int(targets.reshape(-1)[first])
    position = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), tuple(targets.shape)))
    count = int(bad.sum())
    raise ValueError(f"{op}: target {value} at position {position} is out of range: targets must lie in "
                     f"[0, {n_classes}) (the number of classes) or equal ignore_index={ignore_index} "
                     f"({count} bad target{'s' if count > 1 else ''} in all)")


def _shape_problem(n_classes: int) -> Optional[str]:
    if n_classes >= 2**31:  # class offsets are 32-bit inside a row
        return f"the vocabulary has {n_classes} classes, 2**31 or more"
    return None


def _grad_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of x's shape, dtype and row stride (so rows align as x's do): the layout of the
    logits' gradient on both fused paths (the binding's too)."""
    if x.shape[0] <= 1 or x.stride(0) == x.shape[1]:
        return x.new_empty(x.shape)
    return x.new_empty_strided(x.shape, (x.stride(0), 1))


def _count_valid(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Rows that count, as an fp32 device scalar (no sync)."""
    return (targets != ignore_index).sum(dtype=torch.float32)


# ============================================================================================ Triton path
def _block(n_classes: int, cap: int) -> int:
    return min(triton.next_power_of_2(n_classes), cap)


def _num_warps(block: int) -> int:
    # About 16 elements per thread (two 16-byte loads of bf16), between 1 and 16 warps.
    return min(max(block // 512, 1), 16)


# ------------------------------------------------------------------------------------------------ kernels
# How a program walks its row of V elements (the same in both kernels):
#   head  the few elements before the first 16-byte-aligned one (a row of 50257 bf16 starts anywhere);
#   main  N_MAIN full blocks, unmasked and 16-byte aligned, so they compile to vector loads and stores
#         (a mask against V = 50257 would force one 2-byte access per element);
#   tail  N_TAIL masked blocks for the rest.
# Trip counts are constexprs, fixed by V, BLOCK and ALIGN alone (one compilation per vocabulary size, which a
# model fixes). That also suits Triton 3.6's interpreter, which cannot run ``range`` over a runtime scalar with
# NumPy >= 2.4 (its scalars are 1-element arrays), and the tests run these kernels under the interpreter.
if triton is not None:

    @triton.jit
    def _online_lse_update(m, s, x):
        # Running max m and sum s of exp(x - m): one exp per element, plus two block reductions.
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        return m_new, s

    @triton.jit
    def _ce_fwd_kernel(X, stride_x, TARGETS, LOSS, LSE, n_classes, ignore_index, BLOCK: tl.constexpr,
                       ALIGN: tl.constexpr, N_MAIN: tl.constexpr, N_TAIL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_start = row * stride_x
        head = (ALIGN - row_start % ALIGN) % ALIGN
        cols = tl.arange(0, BLOCK)
        # m starts at the lowest finite float, not -inf: a block with every element masked (an empty head) must
        # not produce exp(-inf - -inf) = nan.
        m = tl.max(tl.full([BLOCK], -3.4028234663852886e38, tl.float32), axis=0)
        s = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), axis=0)

        head_cols = tl.arange(0, ALIGN)
        x_head = tl.load(X + row_start + head_cols, mask=(head_cols < head) & (head_cols < n_classes),
                         other=float("-inf")).to(tl.float32)
        m, s = _online_lse_update(m, s, x_head)
        aligned = tl.multiple_of(row_start + head, ALIGN)  # X itself is 16-byte aligned (Triton checks)
        for i in range(N_MAIN):
            x = tl.load(X + aligned + i * BLOCK + cols).to(tl.float32)
            m, s = _online_lse_update(m, s, x)
        for i in range(N_TAIL):
            offs = head + (N_MAIN + i) * BLOCK + cols
            x = tl.load(X + row_start + offs, mask=offs < n_classes, other=float("-inf")).to(tl.float32)
            m, s = _online_lse_update(m, s, x)
        lse = m + tl.log(s)

        target = tl.load(TARGETS + row)
        in_range = (target >= 0) & (target < n_classes)
        x_target = tl.load(X + row_start + tl.where(in_range, target, 0)).to(tl.float32)
        loss = tl.where(in_range, lse - x_target, float("nan"))  # nan: a bad target that was not validated
        loss = tl.where(target == ignore_index, 0.0, loss)
        tl.store(LOSS + row, loss)
        tl.store(LSE + row, lse)

    @triton.jit
    def _ce_grad(x, offs, target, lse, scale, valid):
        # (softmax - onehot) * scale; exactly zero on ignored rows, even where such a row holds inf.
        dx = (tl.exp(x.to(tl.float32) - lse) - tl.where(offs == target, 1.0, 0.0)) * scale
        return tl.where(valid, dx, 0.0)

    @triton.jit
    def _ce_bwd_kernel(X, DX, stride, TARGETS, LSE, SCALE, n_classes, ignore_index, BLOCK: tl.constexpr,
                       ALIGN: tl.constexpr, N_MAIN: tl.constexpr, N_TAIL: tl.constexpr):
        # dx = (softmax(x) - onehot(target)) * SCALE, SCALE = grad_loss / n_valid (a device scalar: no sync).
        # DX has X's row stride, so both are aligned alike; DX may be X itself (linear_cross_entropy): every
        # element is read before it is written, by the same program.
        row = tl.program_id(0).to(tl.int64)
        row_start = row * stride
        head = (ALIGN - row_start % ALIGN) % ALIGN
        target = tl.load(TARGETS + row)
        lse = tl.load(LSE + row)
        valid = target != ignore_index
        in_range = (target >= 0) & (target < n_classes)
        scale = tl.where(in_range, tl.load(SCALE), float("nan"))  # nan: a bad target that was not validated
        cols = tl.arange(0, BLOCK)

        head_cols = tl.arange(0, ALIGN)
        head_mask = (head_cols < head) & (head_cols < n_classes)
        x_head = tl.load(X + row_start + head_cols, mask=head_mask, other=0.0)
        dx_head = _ce_grad(x_head, head_cols, target, lse, scale, valid)
        tl.store(DX + row_start + head_cols, dx_head.to(DX.dtype.element_ty), mask=head_mask)
        aligned = tl.multiple_of(row_start + head, ALIGN)
        for i in range(N_MAIN):
            x = tl.load(X + aligned + i * BLOCK + cols)
            dx = _ce_grad(x, head + i * BLOCK + cols, target, lse, scale, valid)
            tl.store(DX + aligned + i * BLOCK + cols, dx.to(DX.dtype.element_ty))
        for i in range(N_TAIL):
            offs = head + (N_MAIN + i) * BLOCK + cols
            mask = offs < n_classes
            x = tl.load(X + row_start + offs, mask=mask, other=0.0)
            dx = _ce_grad(x, offs, target, lse, scale, valid)
            tl.store(DX + row_start + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _walk(n_classes: int, element_size: int, block: int) -> dict:
    """The constexprs of a row walk: BLOCK, ALIGN, N_MAIN, N_TAIL (see the comment above the kernels)."""
    align = max(1, 16 // element_size)
    n_main = max(0, n_classes - (align - 1)) // block  # full blocks that fit after the longest head
    n_tail = triton.cdiv(n_classes - n_main * block, block)
    return dict(BLOCK=block, ALIGN=align, N_MAIN=n_main, N_TAIL=n_tail)


def _launch_forward(x: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                    block: Optional[int] = None, num_warps: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (0 for ignored rows) and logsumexp, both fp32, of x (N, V) with x.stride(1) == 1."""
    rows, n_classes = x.shape
    loss = torch.empty(rows, dtype=torch.float32, device=x.device)
    lse = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        block = block or _block(n_classes, FORWARD_MAX_BLOCK)
        _ce_fwd_kernel[(rows,)](x, x.stride(0), targets, loss, lse, n_classes, ignore_index,
                                **_walk(n_classes, x.element_size(), block),
                                num_warps=num_warps or _num_warps(block))
    return loss, lse


def _launch_backward(x: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                     ignore_index: int, out: torch.Tensor, block: Optional[int] = None,
                     num_warps: Optional[int] = None) -> torch.Tensor:
    """Writes (softmax(x) - onehot) * scale into ``out`` (x's shape and row stride; may be x); returns out."""
    rows, n_classes = x.shape
    if rows > 1 and out.stride(0) != x.stride(0):
        raise AssertionError("cross_entropy: the gradient buffer must have the logits' row stride")
    if rows:
        block = block or _block(n_classes, BACKWARD_MAX_BLOCK)
        _ce_bwd_kernel[(rows,)](x, out, x.stride(0), targets, lse, scale, n_classes, ignore_index,
                                **_walk(n_classes, x.element_size(), block),
                                num_warps=num_warps or _num_warps(block))
    return out


# ------------------------------------------------------------------------------------------------ autograd
class _CrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, targets, ignore_index):
        loss_rows, lse = _launch_forward(x, targets, ignore_index)
        n_valid = _count_valid(targets, ignore_index)
        ctx.save_for_backward(x, targets, lse, n_valid)
        ctx.ignore_index = ignore_index
        return loss_rows.sum() / n_valid  # 0/0 = nan when every row is ignored, as in PyTorch

    @staticmethod
    def backward(ctx, grad_loss):
        x, targets, lse, n_valid = ctx.saved_tensors
        scale = (grad_loss.float() / n_valid).reshape(1)
        grad = _grad_like(x)
        _launch_backward(x, targets, lse, scale, ctx.ignore_index, grad)
        return grad, None, None


def _chunk_torch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, scale: torch.Tensor,
                 want_grad: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Plain-torch loss sum and d_logits (softmax - onehot) * scale of one chunk, fp32 inside.

    In place on the chunk's fp32 logits (a copy for fp16/bf16; the fp32 logits themselves otherwise: they are
    this chunk's own and dead afterwards), so the (rows, V) block is swept a few times and never reallocated:
    on a CPU, where this path runs, those sweeps are what the loss costs beside its matmuls."""
    x = logits if logits.dtype == torch.float32 else logits.float()
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    picked = x.gather(1, safe[:, None]).squeeze(1)
    peak = x.amax(dim=1)
    x.sub_(peak[:, None]).exp_()
    total = x.sum(dim=1)
    lse = peak + total.log()
    loss_sum = torch.where(valid, lse - picked, 0.0).sum()
    if not want_grad:
        return loss_sum, None
    weight = torch.where(valid, scale, 0.0)
    x.mul_((weight / total)[:, None])
    x[torch.arange(x.shape[0], device=x.device), safe] -= weight
    return loss_sum, x.to(logits.dtype)


_FUSED_FP32_ADDMM = {}  # device type -> whether torch.addmm(out_dtype=float32) works there


def _add_matmul_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, in place, the product kept in fp32 for fp16/bf16 a and b (one rounding at the end
    of all chunks, not one per chunk).

    CUDA: one cuBLAS call with fp32 output accumulating into acc (``addmm`` with ``out_dtype``, PyTorch >= 2.8):
    no temporary, acc read and written once. Elsewhere (CPU, the tests) fp32 copies of the chunk's operands."""
    if a.dtype not in _LOW_PRECISION:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        if _FUSED_FP32_ADDMM.get("cuda", True):
            try:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                _FUSED_FP32_ADDMM["cuda"] = True
                return
            except (TypeError, RuntimeError, NotImplementedError):
                _FUSED_FP32_ADDMM["cuda"] = False
        acc += a @ b  # an older PyTorch: the chunk's product rounds to a's dtype before the fp32 sum
        return
    acc.addmm_(a.float(), b.float())


class _LinearCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, chunk, path, want_grads):
        # The inputs were cast already; autocast must not recast the chunk matmuls (nor meet their out=).
        with torch.autocast(h.device.type, enabled=False):
            return _LinearCrossEntropyFn._forward(ctx, h, weight, targets, ignore_index, chunk, path, want_grads)

    @staticmethod
    def _forward(ctx, h, weight, targets, ignore_index, chunk, path, want_grads):
        rows = h.shape[0]
        n_valid = _count_valid(targets, ignore_index)
        scale = (1.0 / n_valid).reshape(1)
        grad_h = grad_w = None
        if want_grads:
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None  # chunks contiguous
            one_chunk = rows <= chunk and weight.dtype == torch.float32  # then mm writes grad_w once, no sum
            grad_w = (torch.empty if one_chunk else torch.zeros)(weight.shape, dtype=torch.float32,
                                                                 device=weight.device) if need_w else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, rows, chunk):
            h_c = h[start:start + chunk]
            t_c = targets[start:start + chunk]
            logits = h_c @ weight.T  # (chunk, V), input dtype: the only logits that ever exist
            if path == "cuda":
                loss_rows, lse = cross_entropy_rows(logits, t_c, ignore_index)
                loss_sum += loss_rows.sum()
                d_logits = None
                if want_grads:
                    cross_entropy_grad_(logits, t_c, lse, scale, ignore_index)
                    d_logits = logits
            elif path == "triton":
                loss_rows, lse = _launch_forward(logits, t_c, ignore_index)
                loss_sum += loss_rows.sum()
                d_logits = _launch_backward(logits, t_c, lse, scale, ignore_index, out=logits) if want_grads \
                    else None
            else:
                chunk_loss, d_logits = _chunk_torch(logits, t_c, ignore_index, scale, want_grads)
                loss_sum += chunk_loss
            if grad_h is not None:
                torch.mm(d_logits, weight, out=grad_h[start:start + chunk])
            if grad_w is not None:
                if one_chunk:
                    torch.mm(d_logits.T, h_c, out=grad_w)
                else:
                    _add_matmul_fp32(grad_w, d_logits.T, h_c)
            del logits, d_logits
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return loss_sum / n_valid  # nan when every row is ignored, as in PyTorch; the gradients are zero

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        g = grad_loss.float()
        dh = (grad_h * g).to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * g).to(grad_w.dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None


# ============================================================================================== CUDA path
# The binding's functions (csrc/bindings/cuda_ops.cpp, cross-entropy section) as custom operators, with fakes
# giving the binding's output metadata (for tracing); cross_entropy_mean has its backward registered, the rest
# are linear_cross_entropy's per-chunk steps (its autograd function above does the chain rule itself).
def _cross_entropy_mean_impl(logits: Tensor, targets: Tensor, ignore_index: int) -> Tuple[Tensor, Tensor, Tensor]:
    loss_rows, lse = cuda_module().cross_entropy_forward(logits, targets, ignore_index)
    n_valid = _count_valid(targets, ignore_index)
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


cross_entropy_mean = cuda_op("cross_entropy_mean")(_cross_entropy_mean_impl)
cross_entropy_rows = cuda_op("cross_entropy_rows")(_cross_entropy_rows_impl)
cross_entropy_grad = cuda_op("cross_entropy_grad")(_cross_entropy_grad_impl)
cross_entropy_grad_ = cuda_op("cross_entropy_grad_", mutates_args=("logits",))(_cross_entropy_grad_inplace_impl)


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
    return _grad_like(logits)


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


def _cuda_cross_entropy(logits2d: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    return cross_entropy_mean(logits2d, targets, ignore_index)[0]
