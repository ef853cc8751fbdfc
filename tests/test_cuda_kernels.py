"""The CUDA C++ kernels (gpt2fast._cuda_ops, csrc/kernels) called directly, against float64 references with
flash-attention's tolerance rule (tests/ops_testing.py); their input checks; determinism.

Skipped where the extension cannot be loaded (no CUDA GPU, CPU-only torch, no nvcc): there, CI still compiles
every kernel for sm_70/75, sm_80 and sm_90 in one nvcc call, as the extension build does
(tools/compile_cuda_kernels.sh). On a GPU machine without the prebuilt module the first test compiles it
(gpt2fast.ops._cuda, a few minutes once, then cached).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ops_testing import assert_within_flash_rule, max_error

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


# ---------------------------------------------------------------------------------------------- attention
def needs_sm80():
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the CUDA attention kernel needs sm_80+ (mma.m16n8k16)")


ATTN_SHAPES = [(1, 1, 1, 64), (3, 7, 257, 64), (2, 3, 1025, 64), (1, 2, 1023, 128), (2, 12, 1024, 64)]


def attn_reference(q, k, v, do, causal, cast):
    """o, dq, dk, dv in `cast` arithmetic (scores and softmax in at least fp32, as SDPA's math path)."""
    qq, kk, vv = (t.detach().to(cast).requires_grad_() for t in (q, k, v))
    T, D = q.shape[-2:]
    s = (qq @ kk.transpose(-2, -1)).to(torch.promote_types(cast, torch.float32)) / D ** 0.5
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    o = torch.softmax(s, -1).to(cast) @ vv
    return (o.detach(), *torch.autograd.grad(o, (qq, kk, vv), do.to(cast)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention(ops, shape, dtype, causal):
    needs_sm80()
    seed = hash((shape, causal)) % 10_000
    q, k, v, do = (randn(shape, dtype, seed + i) for i in range(4))
    o, lse = ops.attention_forward(q, k, v, causal)
    assert o.dtype == dtype and o.shape == q.shape and lse.shape == shape[:3]
    ref = attn_reference(q, k, v, do, causal, torch.float64)
    lowp = attn_reference(q, k, v, do, causal, dtype)
    assert_within_flash_rule("o", o, lowp[0], ref[0])
    grads = ops.attention_backward(do, q, k, v, o, lse, causal)
    for name, got, lp, r in zip(("dq", "dk", "dv"), grads, lowp[1:], ref[1:]):
        if r.abs().max().item() == 0:
            # T = 1: dq and dk are exactly 0 (dS = P (dP - delta) with P = 1 and delta = dP), and so is the plain
            # computation's, which makes the flash rule's bound 0. The kernel's dP (the mma's fp32 sum) and delta
            # (rowsum(dO * O) over the stored O, as flash-attention's) add the same products in different orders,
            # so its dS is tiny but not 0: the bound gets a floor of one rounding step at the inputs' scale (1),
            # as in tests/cpp/test_attention_emu.cpp.
            floor = torch.finfo(dtype).eps / 2
            assert max_error(got, r) <= floor, f"{name}: max error {max_error(got, r):.3e} > floor {floor:.3e}"
        else:
            assert_within_flash_rule(name, got, lp, r)


def test_attention_strided_views_and_determinism(ops):
    """q, k, v as slices of one (B, T, 3, H, D) projection are read in place; results land in (B, T, H, D)
    order; the backward gives bitwise the same gradients on every run (no atomics)."""
    needs_sm80()
    B, T, H, D = 2, 300, 4, 64
    qkv = randn((B, T, 3, H, D), torch.bfloat16, 11)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    do = randn((B, H, T, D), torch.bfloat16, 12)
    o, lse = ops.attention_forward(q, k, v, True)
    assert o.stride(1) < o.stride(2), "the output should be stored (B, T, H, D) like its input"
    o_packed, _ = ops.attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), True)
    assert torch.equal(o, o_packed)
    first = ops.attention_backward(do, q, k, v, o, lse, True)
    for _ in range(2):
        again = ops.attention_backward(do, q, k, v, o, lse, True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_attention_op_backend_cuda_matches_reference():
    """gpt2fast.ops.attention(backend="cuda") end to end through autograd, against the float64 reference."""
    from gpt2fast import ops as gops
    from gpt2fast.ops import _cuda

    if _cuda.load_cuda_ops() is None:
        pytest.skip(f"gpt2fast._cuda_ops unavailable: {_cuda.cuda_ops_status().reason}")
    needs_sm80()
    q, k, v, do = (randn((2, 3, 129, 64), torch.bfloat16, 20 + i).requires_grad_() for i in range(4))
    o = gops.attention(q, k, v, causal=True, backend="cuda")
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    ref = attn_reference(q, k, v, do, True, torch.float64)
    lowp = attn_reference(q, k, v, do, True, torch.bfloat16)
    for name, got, lp, r in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), lowp, ref):
        assert_within_flash_rule(name, got.detach(), lp, r)


@pytest.mark.parametrize("op", ["layer_norm", "bias_gelu", "cross_entropy", "linear_cross_entropy"])
def test_op_backend_cuda_matches_reference(op):
    """Each op's backend="cuda" path end to end (the torch.library operators and their registered backward),
    output and every gradient, against the float64 reference with the flash rule, on odd shapes in bf16
    (fp16 before sm_80); LayerNorm with autocast's fp32 residual stream beside bf16 activations."""
    from gpt2fast import ops as gops
    from gpt2fast.ops import _cuda

    if _cuda.load_cuda_ops() is None:
        pytest.skip(f"gpt2fast._cuda_ops unavailable: {_cuda.cuda_ops_status().reason}")
    dtype = dtypes()[-1]
    targets = torch.randint(0, 50257, (37,), device="cuda")
    targets[::5] = -100
    if op == "layer_norm":
        inputs = [randn((3, 7, 771), dtype, 1), randn((3, 7, 771), torch.float32, 2),
                  1 + randn((771,), torch.float32, 3, 0.2), randn((771,), torch.float32, 4, 0.2)]
        run = lambda be, x, r, w, b: sum(t.float().square().sum() for t in gops.layer_norm(x, w, b, r, backend=be))
    elif op == "bias_gelu":
        inputs = [randn((5, 3, 3077), dtype, 5), randn((3077,), dtype, 6, 0.5)]
        run = lambda be, x, b: gops.bias_gelu(x, b, backend=be).float().square().sum()
    elif op == "cross_entropy":
        inputs = [randn((37, 50257), dtype, 7, 3.0)]
        run = lambda be, x: gops.cross_entropy(x, targets, backend=be)
    else:
        inputs = [randn((37, 768), dtype, 8), randn((50257, 768), dtype, 9, 0.05)]
        run = lambda be, h, w: gops.linear_cross_entropy(h, w, targets, backend=be)

    def outputs(backend, cast=None):
        leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in inputs]
        out = run(backend, *leaves)
        return [out.detach()] + list(torch.autograd.grad(out, leaves))

    ours, lowp, ref = outputs("cuda"), outputs("torch"), outputs("torch", torch.float64)
    for i, (o, lp, r) in enumerate(zip(ours, lowp, ref)):
        assert o.dtype == lp.dtype, (op, i, o.dtype, lp.dtype)
        assert_within_flash_rule(f"{op} output {i}", o, lp, r)


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
    if torch.cuda.get_device_capability()[0] >= 8:
        q = torch.randn(1, 2, 8, 64, device="cuda", dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="float16 or bfloat16"):
            ops.attention_forward(q.float(), q.float(), q.float(), True)
        with pytest.raises(RuntimeError, match="head dim 32"):
            ops.attention_forward(q[..., :32], q[..., :32], q[..., :32], True)
        with pytest.raises(RuntimeError, match="must have the same|has shape"):
            ops.attention_forward(q, q[:, :1], q, True)
    with pytest.raises(RuntimeError, match="step must be >= 1"):
        ops.adamw_step([w], [b], [w.clone()], [w.clone()], 1e-3, 0.9, 0.95, 1e-8, 0.0, 0)
