"""AdamW whose step over a whole parameter group is one CUDA launch (csrc/kernels/adamw.cu).

    from gpt2fast.ops.adamw import AdamW
    opt = AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)   # backend="auto"

The update is torch.optim.AdamW's (decoupled weight decay, bias correction, no amsgrad), computed in fp32 for
every parameter dtype, with the moments kept in fp32. On CUDA tensors with the CUDA ops available, each group
(split by device, parameter dtype, gradient dtype and step count) is updated by one kernel launch over a table
of its tensors; elsewhere a plain PyTorch loop (``adamw_reference_step``) does the same arithmetic, with a
one-time warning when the CUDA path was wanted but cannot run. ``backend``: "auto", "cuda" (``BackendUnavailable``
where it cannot run) or "torch". No Triton path: the step is one launch over a table of tensors.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, List

import torch

from gpt2fast.ops import _dispatch
from gpt2fast.ops._common import cuda_module

BACKENDS = ("auto", "cuda", "torch")


def adamw_reference_step(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
                         exp_avg_sqs: List[torch.Tensor], lr: float, beta1: float, beta2: float, eps: float,
                         weight_decay: float, step: int) -> None:
    """One AdamW step in place, in fp32, with plain PyTorch ops (the reference of the fused kernel)."""
    bias1 = 1.0 - beta1 ** step
    bias2_sqrt = math.sqrt(1.0 - beta2 ** step)
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p32 = p.float()
        g32 = g.float()
        m.lerp_(g32, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)
        p32.mul_(1.0 - lr * weight_decay)
        p32.addcdiv_(m, (v.sqrt() / bias2_sqrt).add_(eps), value=-lr / bias1)
        if p32.data_ptr() != p.data_ptr():
            p.copy_(p32)


class AdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, backend: str = "auto"):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"AdamW: lr must be a finite number >= 0, got {lr!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW: betas must be two numbers in [0, 1), got {betas!r}")
        if not eps >= 0:
            raise ValueError(f"AdamW: eps must be >= 0, got {eps!r}")
        if not weight_decay >= 0:
            raise ValueError(f"AdamW: weight_decay must be >= 0, got {weight_decay!r}")
        if backend not in BACKENDS:
            raise ValueError(f"AdamW: backend={backend!r} is not one of {BACKENDS}")
        self.backend = backend
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _path(self, tensors: List[torch.Tensor]) -> str:
        if self.backend == "torch":
            return "torch"
        reason = _dispatch.why_not_cuda(tensors)
        if reason is None and not all(t.is_contiguous() for t in tensors):
            reason = "a parameter or gradient is not contiguous (the kernel updates flat buffers in place)"
        if reason is None:
            return "cuda"
        if self.backend == "cuda":
            raise _dispatch.BackendUnavailable(f"AdamW: the CUDA C++ backend cannot run here: {reason}. Use "
                                               f"backend='auto' to fall back to the PyTorch loop, or backend='torch'.")
        _dispatch.warn_once("adamw", reason, stacklevel=4)
        return "torch"

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            launches = defaultdict(lambda: ([], [], [], []))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                           memory_format=torch.preserve_format)
                state["step"] += 1
                key = (p.device, p.dtype, p.grad.dtype, int(state["step"].item()))
                for bucket, t in zip(launches[key], (p, p.grad, state["exp_avg"], state["exp_avg_sq"])):
                    bucket.append(t)
            for (_, _, _, step), (ps, gs, ms, vs) in launches.items():
                args = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"], step)
                if self._path(ps + gs) == "cuda":  # the moments are ours: allocated contiguous
                    cuda_module().adamw_step(ps, gs, ms, vs, *args)
                else:
                    adamw_reference_step(ps, gs, ms, vs, *args)
        return loss
