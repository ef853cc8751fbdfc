"""The CUDA kernels' PyTorch custom operators (gpt2fast/ops/_cuda_library.py), checked without a GPU.

A plain-PyTorch stand-in with the binding's contract (csrc/bindings/cuda_ops.cpp: the same outputs, dtypes and
layouts) takes the extension module's place and is registered as the operators' CPU kernel. Then
``torch.library.opcheck`` tests each operator's schema, fake implementation (against the real outputs'
metadata), autograd registration and AOT dispatch; the gradients through the wrappers match plain PyTorch;
and a GPT-2-block-like function using every operator compiles with ``fullgraph=True`` (no graph break) and
gives the eager results. On a GPU the same registrations run the real kernels (tests/test_cuda_kernels.py).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gpt2fast.ops import _cuda_library as L


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
        out = L.empty_attention_like(like)
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
        result = out if out is not None else L.grad_like(logits)
        result.copy_(g)
        return result


IMPLS = {
    "attention_fwd": L._attention_fwd_impl, "attention_bwd": L._attention_bwd_impl,
    "layer_norm_fwd": L._layer_norm_fwd_impl, "add_layer_norm_fwd": L._add_layer_norm_fwd_impl,
    "layer_norm_bwd": L._layer_norm_bwd_impl, "bias_gelu_fwd": L._bias_gelu_fwd_impl,
    "bias_gelu_bwd": L._bias_gelu_bwd_impl, "cross_entropy_mean": L._cross_entropy_mean_impl,
    "cross_entropy_rows": L._cross_entropy_rows_impl, "cross_entropy_grad": L._cross_entropy_grad_impl,
    "cross_entropy_grad_": L._cross_entropy_grad_inplace_impl,
}
_registered = False


@pytest.fixture
def stand_in(monkeypatch):
    global _registered
    if not _registered:  # the CPU kernels stay registered for the session; they call cuda_module()
        for name, impl in IMPLS.items():
            torch.library.register_kernel(f"gpt2fast::{name}", "cpu", impl)
        _registered = True
    monkeypatch.setattr(L, "_MODULE_OVERRIDE", StandIn())


def rand(*shape, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(requires_grad)


def strided_qkv(B=2, T=9, H=3, D=64):
    qkv = rand(B, T, 3, H, D, requires_grad=False)
    return [qkv[:, :, i].transpose(1, 2).requires_grad_() for i in range(3)]  # (B, T, H, D) storage


def separate_qkv(B=2, T=9, H=3, D=64):
    """(B, H, T, D) views of (B, T, H, D) tensors, one storage each (opcheck's AOT test wants unaliased inputs)."""
    return [rand(B, T, H, D, requires_grad=False, seed=10 + i).transpose(1, 2).requires_grad_() for i in range(3)]


def op_cases():
    q, k, v = separate_qkv()
    o, lse = StandIn().attention_forward(q.detach(), k.detach(), v.detach(), True)
    x, r, w, b = rand(4, 5, 24, seed=1), rand(4, 5, 24, seed=2), rand(24, seed=3), rand(24, seed=4)
    h = (x + r).detach().contiguous()
    _, _, mean, rstd = StandIn().layer_norm_forward(h, w.detach(), b.detach())
    logits, targets = rand(6, 11, seed=5), torch.tensor([1, 0, -100, 10, 3, 3])
    padded = rand(6, 16, requires_grad=False, seed=6)[:, :11]
    lse_ce = torch.logsumexp(padded, -1)
    scale = torch.tensor([0.2])
    return {
        "attention_fwd": (q, k, v, True),
        "attention_bwd": (rand(2, 3, 9, 64, requires_grad=False), q.detach(), k.detach(), v.detach(), o, lse, True),
        "layer_norm_fwd": (x, w, b, 1e-5),
        "add_layer_norm_fwd": (x, w, b, r, 1e-5),
        "layer_norm_bwd": (h, rand(4, 5, 24, requires_grad=False), None, w.detach(), mean, rstd),
        "bias_gelu_fwd": (rand(3, 7, 40), rand(40, seed=7)),
        "bias_gelu_bwd": (rand(3, 40, requires_grad=False), rand(40, requires_grad=False),
                          rand(3, 40, requires_grad=False, seed=8)),
        "cross_entropy_mean": (logits, targets, -100),
        "cross_entropy_rows": (padded, targets, -100),
        "cross_entropy_grad": (padded, targets, lse_ce, scale, -100),
        "cross_entropy_grad_": (padded.clone(), targets, lse_ce, scale, -100),
    }


@pytest.mark.parametrize("name", list(IMPLS))
def test_opcheck(stand_in, name):
    args = op_cases()[name]
    op = getattr(torch.ops.gpt2fast, name).default
    torch.library.opcheck(op, args)


def test_fake_layouts_match_the_binding(stand_in):
    """Attention results land in the (B, T, H, D) order of their inputs, and the fake says so too."""
    q, k, v = strided_qkv()
    o, _ = torch.ops.gpt2fast.attention_fwd(q, k, v, True)
    assert o.stride(1) < o.stride(2)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fo, flse = torch.ops.gpt2fast.attention_fwd(fq, fk, fv, True)
    assert fo.stride() == o.stride() and flse.shape == (2, 3, 9)


def test_wrappers_give_the_reference_gradients(stand_in):
    q, k, v = strided_qkv()
    x, r = rand(4, 5, 24, seed=1), rand(4, 5, 24, seed=2)
    w, b, bias = rand(24, seed=3), rand(24, seed=4), rand(24, seed=9)
    logits, targets = rand(20, 24, seed=5), torch.randint(0, 24, (20,), generator=torch.Generator().manual_seed(0))
    targets[::4] = -100

    def model(use_ops):
        if use_ops:
            a = L.attention(q, k, v, True)
            y, h = L.layer_norm(x, w, b, r, 1e-5)
            z = L.bias_gelu(y, bias)
            loss = L.cross_entropy(logits, targets, -100)
        else:
            T = q.shape[2]
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = x + r
            y = F.layer_norm(h, (24,), w, b, 1e-5)
            z = F.gelu(y + bias, approximate="tanh")
            loss = F.cross_entropy(logits, targets, ignore_index=-100)
            assert T == 9
        return a.square().sum() + h.sin().sum() + z.square().sum() + loss

    leaves = (q, k, v, x, r, w, b, bias, logits)
    ours = torch.autograd.grad(model(True), leaves)
    ref = torch.autograd.grad(model(False), leaves)
    for name, a, e in zip("q k v x r w b bias logits".split(), ours, ref):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=name)


def test_compiles_without_graph_breaks(stand_in):
    """Every operator in one function under torch.compile(fullgraph=True): a graph break would raise."""
    q, k, v = strided_qkv()
    x, r, w, b, bias = rand(2, 9, 192, seed=1), rand(2, 9, 192, seed=2), rand(192, seed=3), rand(192, seed=4), \
        rand(192, seed=5)
    targets = torch.randint(0, 192, (18,), generator=torch.Generator().manual_seed(1))

    def block(q, k, v, x, r, w, b, bias):
        a = L.attention(q, k, v, True).transpose(1, 2).reshape(2, 9, 192)
        y, h = L.layer_norm(a, w, b, x + r, 1e-5)
        z = L.bias_gelu(y, bias)
        return L.cross_entropy(z.reshape(18, 192), targets, -100) + h.mean()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    args = (q, k, v, x, r, w, b, bias)
    got = compiled(*args)
    expected = block(*args)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    g_got = torch.autograd.grad(got, args)
    g_exp = torch.autograd.grad(block(*args), args)
    for a, e in zip(g_got, g_exp):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_without_the_extension_the_operators_say_why(monkeypatch):
    monkeypatch.setattr(L, "_MODULE_OVERRIDE", None)
    from gpt2fast.ops import _cuda

    if _cuda.cuda_ops_status().module is not None:
        pytest.skip("the CUDA ops are available here")
    with pytest.raises(RuntimeError, match="the CUDA ops are not available"):
        L.cuda_module()


def test_inputs_the_kernels_cannot_read_in_place_are_packed_inside_the_operator(stand_in):
    """Rows of 70 elements (not 16-byte chunks): the operator packs them for the kernel, and the results keep
    the layout the fake promises, so tracing and running agree."""
    q, k, v = (rand(2, 3, 9, 70, requires_grad=False, seed=20 + i)[..., 3:67].requires_grad_() for i in range(3))
    torch.library.opcheck(torch.ops.gpt2fast.attention_fwd.default, (q, k, v, False))
    o = L.attention(q, k, v, False)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_layer_norm_on_an_fp32_stream_with_bf16_activations(stand_in):
    """Autocast's mix (bf16 sublayer output, fp32 residual stream and parameters), which the kernel does not
    take as is: the wrapper rounds the stream to x's dtype, h comes back in x's dtype, and every gradient in
    its input's dtype."""
    x = rand(3, 5, 32, seed=1).detach().bfloat16().requires_grad_()
    r, w, b = rand(3, 5, 32, seed=2), rand(32, seed=3), rand(32, seed=4)
    y, h = L.layer_norm(x, w, b, r, 1e-5)
    assert y.dtype == h.dtype == torch.bfloat16
    dx, dr, dw, db = torch.autograd.grad((y.float().square().sum() + h.float().sum()), (x, r, w, b))
    assert (dx.dtype, dr.dtype, dw.dtype, db.dtype) == (torch.bfloat16, torch.float32, torch.float32, torch.float32)
    h_ref = (x.float() + r).bfloat16()
    torch.testing.assert_close(h, h_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y.float(), F.layer_norm(h_ref.float(), (32,), w, b, 1e-5), rtol=2e-2, atol=2e-2)
