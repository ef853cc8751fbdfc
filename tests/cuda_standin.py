"""A plain-PyTorch stand-in for the CUDA extension (gpt2fast._cuda_ops), so that each op's custom operators
(``torch.ops.gpt2fast.*``: schemas, fakes, registered backward, tracing) are checked on machines without a GPU.

The stand-in has the binding's contract (csrc/bindings/cuda_ops.cpp: the same outputs, dtypes and layouts, and
its dtype rules) and is registered as the operators' CPU kernel; on a GPU the same registrations run the real
kernels. Each tests/test_ops_<op>.py uses it through its own ``stand_in`` fixture:

    @pytest.fixture
    def stand_in(monkeypatch):
        cuda_standin.install(monkeypatch)
"""
from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F

from gpt2fast.ops import _common

# gpt2fast.ops re-exports each op under its module's name, so fetch the modules themselves.
attention_module = importlib.import_module("gpt2fast.ops.attention")
layer_norm_module = importlib.import_module("gpt2fast.ops.layer_norm")
bias_gelu_module = importlib.import_module("gpt2fast.ops.bias_gelu")
cross_entropy_module = importlib.import_module("gpt2fast.ops.cross_entropy")


class StandIn:
    """The binding's functions in plain PyTorch (fp32 math, explicit backward formulas: a kernel runs below
    autograd), with its output layouts."""

    @staticmethod
    def _probs(q, k, causal):
        T, D = q.shape[-2:]
        s = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(D)
        if causal:
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, -1), torch.logsumexp(s, -1)

    @staticmethod
    def _into(like, value):
        out = attention_module.empty_attention_like(like)
        out.copy_(value)
        return out

    def attention_forward(self, q, k, v, causal, scale=None):
        p, lse = self._probs(q, k, causal)
        return self._into(q, p @ v.float()), lse.contiguous()

    def attention_backward(self, do, q, k, v, o, lse, causal, scale=None):
        p, _ = self._probs(q, k, causal)
        do32, scale = do.float(), 1.0 / math.sqrt(q.shape[-1])
        dv = p.transpose(-2, -1) @ do32
        dp = do32 @ v.float().transpose(-2, -1)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq = ds @ k.float() * scale
        dk = ds.transpose(-2, -1) @ q.float() * scale
        return self._into(q, dq), self._into(k, dk), self._into(v, dv)

    def layer_norm_forward(self, x, weight, bias, residual=None, eps=1e-5):
        # the binding's dtype rules
        assert residual is None or residual.dtype == x.dtype, "residual must have x's dtype"
        assert weight.dtype in (x.dtype, torch.float32) and bias.dtype == weight.dtype
        h = (x + residual).to(x.dtype).contiguous() if residual is not None else None
        src = (h if h is not None else x).float()
        mean = src.mean(-1)
        rstd = (src.var(-1, unbiased=False) + eps).rsqrt()
        y = ((src - mean[..., None]) * rstd[..., None] * weight.float() + bias.float()).to(x.dtype).contiguous()
        return y, h, mean.reshape(-1), rstd.reshape(-1)

    def layer_norm_backward(self, h, dy, dh, weight, mean, rstd):
        width = h.shape[-1]
        xhat = (h.float().reshape(-1, width) - mean[:, None]) * rstd[:, None]
        g = dy.float().reshape(-1, width)
        gx = g * weight.float()
        dx = rstd[:, None] * (gx - gx.mean(-1, keepdim=True) - xhat * (gx * xhat).mean(-1, keepdim=True))
        if dh is not None:
            dx = dx + dh.float().reshape(-1, width)
        dw, db = (g * xhat).sum(0), g.sum(0)
        return dx.reshape(h.shape).to(h.dtype).contiguous(), dw.to(weight.dtype), db.to(weight.dtype)

    def bias_gelu_forward(self, x, bias):
        return F.gelu(x.float() + bias.float(), approximate="tanh").to(x.dtype).contiguous()

    def bias_gelu_backward(self, x, bias, dy):
        z = x.float() + bias.float()
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (z + 0.044715 * z ** 3))
        dz = dy.float() * (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z))
        return dz.to(x.dtype).contiguous(), dz.reshape(-1, z.shape[-1]).sum(0).to(bias.dtype)

    def cross_entropy_forward(self, logits, targets, ignore_index=-100):
        z = logits.float()
        lse = torch.logsumexp(z, -1)
        valid = targets != ignore_index
        picked = z.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]
        return torch.where(valid, lse - picked, 0.0), lse

    def cross_entropy_backward(self, logits, targets, lse, scale, ignore_index=-100, out=None):
        z = logits.float()
        valid = targets != ignore_index
        onehot = F.one_hot(torch.where(valid, targets, 0), z.shape[-1]).float()
        g = torch.where(valid[:, None], (torch.exp(z - lse[:, None]) - onehot) * scale, 0.0)
        result = out if out is not None else cross_entropy_module._grad_like(logits)
        result.copy_(g)
        return result


# Every operator's implementation (a call into the extension module), registered as its CPU kernel.
IMPLS = {
    "attention_fwd": attention_module._attention_fwd_impl,
    "attention_bwd": attention_module._attention_bwd_impl,
    "layer_norm_fwd": layer_norm_module._layer_norm_fwd_impl,
    "add_layer_norm_fwd": layer_norm_module._add_layer_norm_fwd_impl,
    "layer_norm_bwd": layer_norm_module._layer_norm_bwd_impl,
    "bias_gelu_fwd": bias_gelu_module._bias_gelu_fwd_impl,
    "bias_gelu_bwd": bias_gelu_module._bias_gelu_bwd_impl,
    "cross_entropy_mean": cross_entropy_module._cross_entropy_mean_impl,
    "cross_entropy_rows": cross_entropy_module._cross_entropy_rows_impl,
    "cross_entropy_grad": cross_entropy_module._cross_entropy_grad_impl,
    "cross_entropy_grad_": cross_entropy_module._cross_entropy_grad_inplace_impl,
}
_registered = False


def install(monkeypatch) -> StandIn:
    """Register the operators' CPU kernels (once per session: they call ``cuda_module()``, which then returns
    the stand-in) and put the stand-in in the extension's place for this test."""
    global _registered
    if not _registered:
        for name, impl in IMPLS.items():
            torch.library.register_kernel(f"gpt2fast::{name}", "cpu", impl)
        _registered = True
    standin = StandIn()
    monkeypatch.setattr(_common, "_MODULE_OVERRIDE", standin)
    return standin


def opcheck(name: str, args) -> None:
    """torch.library.opcheck of ``torch.ops.gpt2fast.<name>``: schema, fake (against the real outputs'
    metadata), autograd registration and AOT dispatch."""
    torch.library.opcheck(getattr(torch.ops.gpt2fast, name).default, args)


def compiles_like_eager(fn, *args) -> None:
    """``fn`` under torch.compile(fullgraph=True) (a graph break raises) gives the eager results and
    gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(*args)
    expected = fn(*args)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for a, e in zip(torch.autograd.grad(got, args), torch.autograd.grad(fn(*args), args)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def rand(*shape, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(requires_grad)
