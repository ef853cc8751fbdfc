"""The CUDA C++ kernels (gpt2fast._cuda_ops, csrc/kernels) called directly, against float64 references with
flash-attention's tolerance rule (tests/ops_testing.py); their input checks; determinism.

Skipped where the extension cannot be loaded (no CUDA GPU, CPU-only torch, no nvcc): there, CI still compiles
every kernel for sm_70/75, sm_80 and sm_90 (tools/compile_cuda_kernels.sh). On a GPU machine without the
prebuilt module the first test compiles it (gpt2fast.ops._cuda, a few minutes once, then cached).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ops_testing import assert_within_flash_rule

ON_GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not ON_GPU, reason="the CUDA kernels need a CUDA GPU")


@pytest.fixture(scope="module")
def ops():
    from gpt2fast.ops import _cuda

    module = _cuda.load_cuda_ops()
    if module is None:
        pytest.skip(f"gpt2fast._cuda_ops unavailable: {_cuda.cuda_ops_status().reason}")
    return module


def dtypes():
    out = [torch.float32, torch.float16]
    if ON_GPU and torch.cuda.get_device_capability()[0] >= 8:
        out.append(torch.bfloat16)
    return out


def randn(shape, dtype, seed, scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to("cuda", dtype)


# ---------------------------------------------------------------------------------------------- LayerNorm
LN_SHAPES = [(1, 1, 1023), (3, 7, 257), (2, 5, 768), (4, 1600), (2, 8192), (16384, 768)]


def ln_reference(h, w, b, dy, dh, dtype):
    """y, dx, dw, db of LayerNorm(h) in `dtype` arithmetic (float64 for the reference)."""
    hh = h.detach().to(dtype).requires_grad_()
    ww = w.detach().to(dtype).requires_grad_()
    bb = b.detach().to(dtype).requires_grad_()
    y = F.layer_norm(hh, (hh.shape[-1],), ww, bb, 1e-5)
    dx, dw, db = torch.autograd.grad(y, (hh, ww, bb), dy.to(dtype))
    if dh is not None:
        dx = dx + dh.to(dtype)
    return y.detach(), dx, dw, db


@pytest.mark.parametrize("dtype", dtypes(), ids=str)
@pytest.mark.parametrize("shape", LN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("fp32_params", [False, True], ids=["params_like_x", "fp32_params"])
def test_layer_norm(ops, shape, dtype, residual, fp32_params):
    seed = hash((shape, residual, fp32_params)) % 10_000
    width = shape[-1]
    pdtype = torch.float32 if fp32_params else dtype
    x = randn(shape, dtype, seed)
    r = randn(shape, dtype, seed + 1) if residual else None
    w = (1 + randn((width,), torch.float32, seed + 2, 0.2)).to(pdtype)
    b = randn((width,), pdtype, seed + 3, 0.2)
    dy = randn(shape, dtype, seed + 4)
    dh = randn(shape, dtype, seed + 5) if residual else None

    y, h, mean, rstd = ops.layer_norm_forward(x, w, b, r, 1e-5)
    if residual:
        assert torch.equal(h, (x + r).to(dtype)), "h must be x + residual rounded to x's dtype"
    else:
        assert h is None
    h_in = h if residual else x
    y64, dx64, dw64, db64 = ln_reference(h_in, w, b, dy, dh, torch.float64)
    y_lp, dx_lp, dw_lp, db_lp = ln_reference(h_in, w, b, dy, dh, dtype)
    assert y.dtype == dtype and y.shape == x.shape
    assert_within_flash_rule("y", y, y_lp, y64)
    h64 = h_in.double()
    torch.testing.assert_close(mean.double(), h64.mean(-1).reshape(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), (h64.var(-1, unbiased=False) + 1e-5).rsqrt().reshape(-1),
                               rtol=1e-4, atol=1e-4)

    dx, dw, db = ops.layer_norm_backward(h_in, dy, dh, w, mean, rstd)
    assert dx.dtype == dtype and dw.dtype == pdtype and db.dtype == pdtype
    assert_within_flash_rule("dx", dx, dx_lp, dx64)
    assert_within_flash_rule("dweight", dw, dw_lp.to(pdtype), dw64)
    assert_within_flash_rule("dbias", db, db_lp.to(pdtype), db64)


def test_layer_norm_backward_is_deterministic(ops):
    x, w = randn((4096, 768), torch.float32, 1), randn((768,), torch.float32, 2)
    b, dy = randn((768,), torch.float32, 3), randn((4096, 768), torch.float32, 4)
    _, _, mean, rstd = ops.layer_norm_forward(x, w, b, None, 1e-5)
    first = ops.layer_norm_backward(x, dy, None, w, mean, rstd)
    for _ in range(3):
        again = ops.layer_norm_backward(x, dy, None, w, mean, rstd)
        for a, b_ in zip(first, again):
            assert torch.equal(a, b_)


def test_layer_norm_strided_rows(ops):
    """Rows with a stride (a slice of a wider tensor) are read in place; unaligned ones take the scalar path."""
    base = randn((64, 800), torch.float16, 5)
    for x in (base[:, :768], base[:, 3:771]):
        w, b = torch.ones(768, device="cuda", dtype=torch.float16), torch.zeros(768, device="cuda",
                                                                                 dtype=torch.float16)
        y, _, _, _ = ops.layer_norm_forward(x, w, b, None, 1e-5)
        ref = F.layer_norm(x.double(), (768,), w.double(), b.double(), 1e-5)
        lp = F.layer_norm(x, (768,), w, b, 1e-5)
        assert_within_flash_rule("y", y, lp, ref)


# ---------------------------------------------------------------------------------------------- bias + GELU
GELU_SHAPES = [(1, 1, 1), (3, 7, 256), (4, 1023), (5, 3, 3072), (16384, 3072)]


@pytest.mark.parametrize("dtype", dtypes(), ids=str)
@pytest.mark.parametrize("shape", GELU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bias_gelu(ops, shape, dtype):
    seed = hash(shape) % 10_000
    x = randn(shape, dtype, seed)
    bias = randn((shape[-1],), dtype, seed + 1, 0.5)
    dy = randn(shape, dtype, seed + 2)

    def reference(cast):
        xx = x.to(cast).requires_grad_()
        bb = bias.to(cast).requires_grad_()
        y = F.gelu(xx + bb, approximate="tanh")
        dx, db = torch.autograd.grad(y, (xx, bb), dy.to(cast))
        return y.detach(), dx, db

    y64, dx64, db64 = reference(torch.float64)
    y_lp, dx_lp, db_lp = reference(dtype)
    y = ops.bias_gelu_forward(x, bias)
    assert_within_flash_rule("y", y, y_lp, y64)
    dx, db = ops.bias_gelu_backward(x, bias, dy)
    assert_within_flash_rule("dx", dx, dx_lp, dx64)
    assert_within_flash_rule("dbias", db, db_lp, db64)


# ---------------------------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("dtype", dtypes(), ids=str)
@pytest.mark.parametrize("rows,n_classes,padded", [(1, 1, 1), (7, 10, 10), (33, 50257, 50304), (64, 50257, 50257)])
def test_cross_entropy(ops, rows, n_classes, padded, dtype):
    seed = rows * 7 + n_classes
    full = randn((rows, padded), dtype, seed, 3.0)
    logits = full[:, :n_classes]  # a row stride when padded
    targets = torch.randint(0, n_classes, (rows,), generator=torch.Generator().manual_seed(seed)).cuda()
    if rows > 2:
        targets[::3] = -100
    n_valid = (targets != -100).sum().float()
    scale = (torch.tensor(1.0, device="cuda") / n_valid).reshape(1)

    loss, lse = ops.cross_entropy_forward(logits, targets, -100)
    ref = F.cross_entropy(logits.double(), targets, ignore_index=-100, reduction="none")
    lp = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")
    assert_within_flash_rule("loss", loss, lp, ref)
    lse_ref = torch.logsumexp(logits.double(), -1)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)

    grad = ops.cross_entropy_backward(logits, targets, lse, scale, -100, None)
    assert grad.dtype == dtype and grad.stride(0) == logits.stride(0)

    def ref_grad(cast):
        z = logits.detach().to(cast).requires_grad_()
        out = F.cross_entropy(z, targets, ignore_index=-100, reduction="sum") * scale.to(cast)
        return torch.autograd.grad(out, z)[0]

    assert_within_flash_rule("grad", grad, ref_grad(dtype), ref_grad(torch.float64))
    assert (grad[targets == -100] == 0).all()

    in_place = logits.clone()
    ops.cross_entropy_backward(in_place, targets, lse, scale, -100, in_place)
    assert torch.equal(in_place, grad.contiguous())


def test_cross_entropy_bad_target_is_nan(ops):
    logits = randn((2, 10), torch.float32, 3)
    loss, lse = ops.cross_entropy_forward(logits, torch.tensor([3, 11], device="cuda"), -100)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])


# ---------------------------------------------------------------------------------------------- AdamW
@pytest.mark.parametrize("pdtype,gdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32), (torch.float16, torch.float16)],
                         ids=str)
def test_adamw_matches_torch(ops, pdtype, gdtype):
    if pdtype == torch.bfloat16 and torch.bfloat16 not in dtypes():
        pytest.skip("bf16 needs sm_80+")
    sizes = [1, 7, 1023, 16384, 16385, 70001]
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    params = [randn((n,), torch.float32, n) for n in sizes]
    ours = [p.to(pdtype) for p in params]
    m = [torch.zeros(n, device="cuda") for n in sizes]
    v = [torch.zeros(n, device="cuda") for n in sizes]
    ref = [p.to(pdtype).double().requires_grad_() for p in params]
    lp = [p.to(pdtype).float().requires_grad_() for p in params]
    opt_ref = torch.optim.AdamW(ref, foreach=False, **hp)
    opt_lp = torch.optim.AdamW(lp, foreach=False, **hp)
    for step in range(1, 4):
        grads = [randn((n,), gdtype, 100 * step + n) for n in sizes]
        ops.adamw_step(ours, grads, m, v, hp["lr"], *hp["betas"], hp["eps"], hp["weight_decay"], step)
        for r, low, g in zip(ref, lp, grads):
            r.grad, low.grad = g.double(), g.float()
        opt_ref.step()
        opt_lp.step()
    for i, n in enumerate(sizes):
        # torch's fp32 step, rounded to the parameter dtype, is the low-precision peer.
        assert_within_flash_rule(f"param{n}", ours[i], lp[i].detach().to(pdtype), ref[i].detach())


# ---------------------------------------------------------------------------------------------- input checks
def test_input_checks(ops):
    x = torch.randn(4, 8, device="cuda")
    w, b = torch.ones(8, device="cuda"), torch.zeros(8, device="cuda")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        ops.layer_norm_forward(x.cpu(), w, b, None, 1e-5)
    with pytest.raises(RuntimeError, match=r"weight has shape \[7\]"):
        ops.layer_norm_forward(x, w[:7], b, None, 1e-5)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.bias_gelu_forward(x.double(), b.double())
    with pytest.raises(RuntimeError, match="last dimension must be contiguous"):
        ops.bias_gelu_forward(x.t(), torch.zeros(4, device="cuda"))
    with pytest.raises(RuntimeError, match="int64"):
        ops.cross_entropy_forward(x, torch.zeros(4, device="cuda", dtype=torch.int32), -100)
    with pytest.raises(RuntimeError, match="step must be >= 1"):
        ops.adamw_step([w], [b], [w.clone()], [w.clone()], 1e-3, 0.9, 0.95, 1e-8, 0.0, 0)
