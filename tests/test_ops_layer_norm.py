"""Every test of gpt2fast.ops.layer_norm: the Triton kernels against a float64 reference (flash-attention's
tolerance rule), every output and every gradient; dispatch, fallback and argument errors; the CUDA kernels
(GPU only); the CUDA custom operators, checked on the CPU over a stand-in of the binding."""
from __future__ import annotations

import importlib
import warnings

import cuda_standin
import pytest
import torch
import torch.nn.functional as F
from cuda_standin import rand
from ops_testing import (
    DEVICE,
    DTYPES,
    ON_GPU,
    assert_outputs_within_flash_rule,
    assert_within_flash_rule,
    cuda_dtypes,
    cuda_ops_or_skip,
    cuda_randn,
    fresh,
    needs_cuda,
    needs_triton,
)

from gpt2fast.ops import _dispatch
from gpt2fast.ops.layer_norm import MAX_WIDTH, layer_norm, layer_norm_reference

layer_norm_module = importlib.import_module("gpt2fast.ops.layer_norm")

SHAPES = [(1, 1, 1023), (3, 7, 257), (2, 5, 768), (4, 1600), (2, 8192)] + ([(16384, 768)] if ON_GPU else [])


def make_inputs(shape, dtype, seed, residual=True):
    """x, residual (or None), weight near 1, bias near 0, and the gradients arriving at y and h."""
    width = shape[-1]
    x = fresh(shape, dtype, seed=seed)
    r = fresh(shape, dtype, seed=seed + 1) if residual else None
    w = (1 + fresh((width,), torch.float32, scale=0.2, requires_grad=False, seed=seed + 2)).to(dtype)
    b = fresh((width,), dtype, scale=0.2, seed=seed + 3)
    dy = fresh(shape, dtype, requires_grad=False, seed=seed + 4)
    dh = fresh(shape, dtype, requires_grad=False, seed=seed + 5) if residual else None
    return x, r, w.requires_grad_(), b, dy, dh


def run(fn, x, r, w, b, dy, dh, cast=None):
    """Outputs and gradients of ``fn`` as {name: tensor}, on fresh leaf copies of the inputs (cast if asked).

    ``dh`` None with a residual: h is returned but only y is used downstream (e.g. in the last block)."""
    def leaf(t):
        return None if t is None else t.detach().to(cast or t.dtype, copy=True).requires_grad_()

    x, r, w, b = map(leaf, (x, r, w, b))
    if r is None:
        outs = {"y": fn(x, w, b)}
    else:
        y, h = fn(x, w, b, residual=r)
        outs = {"y": y, "h": h}
    used = [(outs["y"], dy)] + ([(outs["h"], dh)] if dh is not None else [])
    inputs = {name: t for name, t in zip(("dx", "dresidual", "dweight", "dbias"), (x, r, w, b)) if t is not None}
    grads = torch.autograd.grad([o for o, _ in used], list(inputs.values()), [g.to(o.dtype) for o, g in used])
    return {**outs, **dict(zip(inputs, grads))}


def check_against_reference(x, r, w, b, dy, dh):
    ours = run(lambda *a, **k: layer_norm(*a, **k, backend="triton"), x, r, w, b, dy, dh)
    torch_lowprec = run(layer_norm_reference, x, r, w, b, dy, dh)
    ref64 = run(layer_norm_reference, x, r, w, b, dy, dh, cast=torch.float64)
    assert set(ours) == set(ref64)
    for name in ref64:
        expected_dtype = w.dtype if name in ("dweight", "dbias") else x.dtype
        assert ours[name].dtype == expected_dtype, (name, ours[name].dtype)
        assert_within_flash_rule(name, ours[name], torch_lowprec[name], ref64[name])
    return ours


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_matches_float64_reference(shape, dtype, residual):
    check_against_reference(*make_inputs(shape, dtype, seed=hash((shape, residual)) % 10_000, residual=residual))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_stream_unused_downstream(dtype):
    x, r, w, b, dy, _ = make_inputs((3, 7, 257), dtype, seed=11)
    check_against_reference(x, r, w, b, dy, None)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_widest_rows_the_kernel_takes(dtype):
    check_against_reference(*make_inputs((2, MAX_WIDTH), dtype, seed=13))


@needs_triton
def test_mixed_dtypes():
    """bf16 activations on an fp32 residual stream with fp32 parameters: outputs in x's dtype, every gradient
    in its input's dtype."""
    x, _, _, _, dy, dh = make_inputs((3, 7, 257), torch.bfloat16, seed=21)
    _, r, w, b, _, _ = make_inputs((3, 7, 257), torch.float32, seed=22)
    ours = run(lambda *a, **k: layer_norm(*a, **k, backend="triton"), x, r, w, b, dy, dh)
    torch_lowprec = run(layer_norm_reference, x, r, w, b, dy, dh)
    ref64 = run(layer_norm_reference, x, r, w, b, dy, dh, cast=torch.float64)
    expected = {"y": x.dtype, "h": x.dtype, "dx": x.dtype, "dresidual": r.dtype, "dweight": w.dtype, "dbias": b.dtype}
    for name, dtype in expected.items():
        assert ours[name].dtype == dtype, (name, ours[name].dtype)
        assert_within_flash_rule(name, ours[name], torch_lowprec[name], ref64[name])


@needs_triton
def test_only_h_used_downstream():
    """y unused (no gradient reaches it): dL/dh goes straight to x and residual, weight and bias get none."""
    x, r, w, b, _, dh = make_inputs((2, 5, 768), torch.float32, seed=12)
    y, h = layer_norm(x, w, b, residual=r, backend="triton")
    dx, dr = torch.autograd.grad([h], [x, r], [dh])
    assert torch.equal(dx, dh) and torch.equal(dr, dh)


@needs_triton
def test_non_contiguous_inputs():
    base = fresh((768, 6), torch.float32, seed=13)
    x = base.t()  # (6, 768), last-dim stride 6
    r = fresh((6, 768 * 2), torch.float32, seed=14)[:, ::2]
    w = fresh((768, 2), torch.float32, seed=15)[:, 0]
    b = fresh((768,), torch.float32, seed=16)
    assert not (x.is_contiguous() or r.is_contiguous() or w.is_contiguous())
    ours = run(lambda *a, **k: layer_norm(*a, **k, backend="triton"), x, r, w, b, torch.ones(6, 768, device=DEVICE),
               torch.ones(6, 768, device=DEVICE))
    ref = run(layer_norm_reference, x, r, w, b, torch.ones(6, 768, device=DEVICE), torch.ones(6, 768, device=DEVICE))
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], msg=name)


@needs_triton
def test_parameter_gradients_are_deterministic():
    inputs = make_inputs((64, 257), torch.float32, seed=17)
    first = run(lambda *a, **k: layer_norm(*a, **k, backend="triton"), *inputs)
    second = run(lambda *a, **k: layer_norm(*a, **k, backend="triton"), *inputs)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@needs_triton
def test_empty_batch():
    x = torch.empty(0, 5, 64, device=DEVICE, requires_grad=True)
    w, b = torch.ones(64, device=DEVICE, requires_grad=True), torch.zeros(64, device=DEVICE, requires_grad=True)
    y = layer_norm(x, w, b, backend="triton")
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


# ------------------------------------------------------------------------------------------------- dispatch
def test_torch_backend_is_the_reference():
    x, r, w, b, _, _ = make_inputs((3, 7, 257), torch.float32, seed=20)
    y, h = layer_norm(x, w, b, residual=r, eps=1e-6, backend="torch")
    y_ref, h_ref = layer_norm_reference(x, w, b, residual=r, eps=1e-6)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)
    assert torch.equal(h, x + r)
    assert torch.equal(layer_norm(x, w, b, backend="torch"), torch.nn.functional.layer_norm(x, (257,), w, b))


def _cpu_inputs(width=64):
    x = torch.randn(4, width)
    return x, torch.ones(width), torch.zeros(width), torch.randn(4, width)


def test_auto_falls_back_on_cpu_with_one_warning(cpu_without_interpreter):
    if _dispatch.triton_import_error():
        pytest.skip("Triton is not installed: the reason is a different one")
    x, w, b, r = _cpu_inputs()
    with pytest.warns(RuntimeWarning, match="layer_norm: using the PyTorch reference because the tensors are on"):
        y, h = layer_norm(x, w, b, residual=r)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        y2, h2 = layer_norm(x, w, b, residual=r)
    y_ref, h_ref = layer_norm_reference(x, w, b, residual=r)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref) and torch.equal(y2, y_ref)


def test_triton_backend_that_cannot_run_says_why(cpu_without_interpreter):
    x, w, b, _ = _cpu_inputs()
    with pytest.raises(RuntimeError, match="layer_norm: the Triton backend cannot run here: .*(CPU|not importable)"):
        layer_norm(x, w, b, backend="triton")


def test_too_wide_rows_fall_back(monkeypatch):
    monkeypatch.setattr(_dispatch, "_warned", set())
    width = MAX_WIDTH + 1
    x, w, b = torch.randn(2, width, device=DEVICE), torch.ones(width, device=DEVICE), torch.zeros(width, device=DEVICE)
    if _dispatch.why_not_triton([x]) is None:  # Triton could run but for the width
        with pytest.raises(RuntimeError, match=f"width {width} exceeds"):
            layer_norm(x, w, b, backend="triton")
        with pytest.warns(RuntimeWarning, match=f"width {width} exceeds"):
            y = layer_norm(x, w, b)
    else:
        y = layer_norm(x, w, b, backend="torch")
    assert torch.equal(y, layer_norm_reference(x, w, b))


def test_bad_backend_name():
    x, w, b, _ = _cpu_inputs()
    with pytest.raises(ValueError, match="backend='cuda!' is not one of"):
        layer_norm(x, w, b, backend="cuda!")


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_mismatched_parameter_shapes(backend):
    x, w, b, r = _cpu_inputs(64)
    with pytest.raises(ValueError, match=r"weight has shape \(63,\) but x has shape \(4, 64\)"):
        layer_norm(x, w[:63], b, backend=backend)
    with pytest.raises(ValueError, match=r"bias has shape \(64, 1\) but x has shape \(4, 64\)"):
        layer_norm(x, w, b[:, None], backend=backend)
    with pytest.raises(ValueError, match=r"residual has shape \(4, 63\) but x has shape \(4, 64\)"):
        layer_norm(x, w, b, residual=r[:, :63], backend=backend)
    with pytest.raises(ValueError, match=r"weight has shape \(63,\)"):
        layer_norm_reference(x, w[:63], b)


# ------------------------------------------------------------------------------------- CUDA kernels (GPU)
# The binding (gpt2fast._cuda_ops) called directly, against float64 references with the flash rule.
CUDA_SHAPES = [(1, 1, 1023), (3, 7, 257), (2, 5, 768), (4, 1600), (2, 8192), (16384, 768)]


@pytest.fixture(scope="module")
def cuda_ops():
    return cuda_ops_or_skip()


def _cuda_reference(h, w, b, dy, dh, dtype):
    """y, dx, dw, db of LayerNorm(h) in `dtype` arithmetic (float64 for the reference)."""
    hh = h.detach().to(dtype).requires_grad_()
    ww = w.detach().to(dtype).requires_grad_()
    bb = b.detach().to(dtype).requires_grad_()
    y = F.layer_norm(hh, (hh.shape[-1],), ww, bb, 1e-5)
    dx, dw, db = torch.autograd.grad(y, (hh, ww, bb), dy.to(dtype))
    if dh is not None:
        dx = dx + dh.to(dtype)
    return y.detach(), dx, dw, db


@needs_cuda
@pytest.mark.parametrize("dtype", cuda_dtypes(), ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("fp32_params", [False, True], ids=["params_like_x", "fp32_params"])
def test_cuda_kernels_match_float64_reference(cuda_ops, shape, dtype, residual, fp32_params):
    seed = hash((shape, residual, fp32_params)) % 10_000
    width = shape[-1]
    pdtype = torch.float32 if fp32_params else dtype
    x = cuda_randn(shape, dtype, seed)
    r = cuda_randn(shape, dtype, seed + 1) if residual else None
    w = (1 + cuda_randn((width,), torch.float32, seed + 2, 0.2)).to(pdtype)
    b = cuda_randn((width,), pdtype, seed + 3, 0.2)
    dy = cuda_randn(shape, dtype, seed + 4)
    dh = cuda_randn(shape, dtype, seed + 5) if residual else None

    y, h, mean, rstd = cuda_ops.layer_norm_forward(x, w, b, r, 1e-5)
    if residual:
        assert torch.equal(h, (x + r).to(dtype)), "h must be x + residual rounded to x's dtype"
    else:
        assert h is None
    h_in = h if residual else x
    y64, dx64, dw64, db64 = _cuda_reference(h_in, w, b, dy, dh, torch.float64)
    y_lp, dx_lp, dw_lp, db_lp = _cuda_reference(h_in, w, b, dy, dh, dtype)
    assert y.dtype == dtype and y.shape == x.shape
    assert_within_flash_rule("y", y, y_lp, y64)
    h64 = h_in.double()
    torch.testing.assert_close(mean.double(), h64.mean(-1).reshape(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), (h64.var(-1, unbiased=False) + 1e-5).rsqrt().reshape(-1),
                               rtol=1e-4, atol=1e-4)

    dx, dw, db = cuda_ops.layer_norm_backward(h_in, dy, dh, w, mean, rstd)
    assert dx.dtype == dtype and dw.dtype == pdtype and db.dtype == pdtype
    assert_within_flash_rule("dx", dx, dx_lp, dx64)
    assert_within_flash_rule("dweight", dw, dw_lp.to(pdtype), dw64)
    assert_within_flash_rule("dbias", db, db_lp.to(pdtype), db64)


@needs_cuda
def test_cuda_backward_is_deterministic(cuda_ops):
    x, w = cuda_randn((4096, 768), torch.float32, 1), cuda_randn((768,), torch.float32, 2)
    b, dy = cuda_randn((768,), torch.float32, 3), cuda_randn((4096, 768), torch.float32, 4)
    _, _, mean, rstd = cuda_ops.layer_norm_forward(x, w, b, None, 1e-5)
    first = cuda_ops.layer_norm_backward(x, dy, None, w, mean, rstd)
    for _ in range(3):
        again = cuda_ops.layer_norm_backward(x, dy, None, w, mean, rstd)
        for a, b_ in zip(first, again):
            assert torch.equal(a, b_)


@needs_cuda
def test_cuda_strided_rows(cuda_ops):
    """Rows with a stride (a slice of a wider tensor) are read in place; unaligned ones take the scalar path."""
    base = cuda_randn((64, 800), torch.float16, 5)
    for x in (base[:, :768], base[:, 3:771]):
        w, b = torch.ones(768, device="cuda", dtype=torch.float16), torch.zeros(768, device="cuda",
                                                                                 dtype=torch.float16)
        y, _, _, _ = cuda_ops.layer_norm_forward(x, w, b, None, 1e-5)
        ref = F.layer_norm(x.double(), (768,), w.double(), b.double(), 1e-5)
        lp = F.layer_norm(x, (768,), w, b, 1e-5)
        assert_within_flash_rule("y", y, lp, ref)


@needs_cuda
def test_cuda_input_checks(cuda_ops):
    x = torch.randn(4, 8, device="cuda")
    w, b = torch.ones(8, device="cuda"), torch.zeros(8, device="cuda")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        cuda_ops.layer_norm_forward(x.cpu(), w, b, None, 1e-5)
    with pytest.raises(RuntimeError, match=r"weight has shape \[7\]"):
        cuda_ops.layer_norm_forward(x, w[:7], b, None, 1e-5)


@needs_cuda
def test_backend_cuda_matches_float64_reference():
    """backend="cuda" end to end (the custom operators and their registered backward), output and every
    gradient, against the float64 reference with the flash rule, on an odd shape in bf16 (fp16 before sm_80),
    with autocast's fp32 residual stream beside bf16 activations."""
    cuda_ops_or_skip()
    dtype = cuda_dtypes()[-1]
    inputs = [cuda_randn((3, 7, 771), dtype, 1), cuda_randn((3, 7, 771), torch.float32, 2),
              1 + cuda_randn((771,), torch.float32, 3, 0.2), cuda_randn((771,), torch.float32, 4, 0.2)]

    def outputs(backend, cast=None):
        x, r, w, b = (t.detach().to(cast or t.dtype).requires_grad_() for t in inputs)
        out = sum(t.float().square().sum() for t in layer_norm(x, w, b, r, backend=backend))
        return [out.detach()] + list(torch.autograd.grad(out, (x, r, w, b)))

    ours, lowp, ref = outputs("cuda"), outputs("torch"), outputs("torch", torch.float64)
    assert_outputs_within_flash_rule("layer_norm", ours, lowp, ref)


# ------------------------------------------------------------------- CUDA custom operators (CPU stand-in)
# torch.ops.gpt2fast.layer_norm_fwd / add_layer_norm_fwd / layer_norm_bwd over tests/cuda_standin.py's
# plain-PyTorch binding: schemas, fakes, registered backward and tracing, without a GPU.
# (the stand_in fixture, which installs it, is in conftest.py)


def _opcheck_args(name):
    x, r, w, b = rand(4, 5, 24, seed=1), rand(4, 5, 24, seed=2), rand(24, seed=3), rand(24, seed=4)
    if name == "layer_norm_fwd":
        return x, w, b, 1e-5
    if name == "add_layer_norm_fwd":
        return x, w, b, r, 1e-5
    h = (x + r).detach().contiguous()
    _, _, mean, rstd = cuda_standin.StandIn().layer_norm_forward(h, w.detach(), b.detach())
    return h, rand(4, 5, 24, requires_grad=False), None, w.detach(), mean, rstd


@pytest.mark.parametrize("name", ["layer_norm_fwd", "add_layer_norm_fwd", "layer_norm_bwd"])
def test_opcheck(stand_in, name):
    cuda_standin.opcheck(name, _opcheck_args(name))


def test_cuda_operators_give_the_reference_gradients(stand_in):
    x, r, w, b = rand(4, 5, 24, seed=1), rand(4, 5, 24, seed=2), rand(24, seed=3), rand(24, seed=4)

    def loss(use_ops):
        if use_ops:
            y, h = layer_norm_module._cuda_layer_norm(x, w, b, r, 1e-5)
            plain = layer_norm_module._cuda_layer_norm(x, w, b, None, 1e-5)
        else:
            h = x + r
            y = F.layer_norm(h, (24,), w, b, 1e-5)
            plain = F.layer_norm(x, (24,), w, b, 1e-5)
        return y.square().sum() + h.sin().sum() + plain.cos().sum()

    ours = torch.autograd.grad(loss(True), (x, r, w, b))
    ref = torch.autograd.grad(loss(False), (x, r, w, b))
    for name, a, e in zip("x r w b".split(), ours, ref):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=name)


def test_cuda_operators_compile_without_graph_breaks(stand_in):
    x, r, w, b = rand(2, 9, 192, seed=1), rand(2, 9, 192, seed=2), rand(192, seed=3), rand(192, seed=4)

    def block(x, r, w, b):
        y, h = layer_norm_module._cuda_layer_norm(x, w, b, r, 1e-5)
        return y.square().mean() + h.mean() + layer_norm_module._cuda_layer_norm(h, w, b, None, 1e-5).mean()

    cuda_standin.compiles_like_eager(block, x, r, w, b)


def test_cuda_operators_on_an_fp32_stream_with_bf16_activations(stand_in):
    """Autocast's mix (bf16 sublayer output, fp32 residual stream and parameters), which the kernel does not
    take as is: the wrapper rounds the stream to x's dtype, h comes back in x's dtype, and every gradient in
    its input's dtype."""
    x = rand(3, 5, 32, seed=1).detach().bfloat16().requires_grad_()
    r, w, b = rand(3, 5, 32, seed=2), rand(32, seed=3), rand(32, seed=4)
    y, h = layer_norm_module._cuda_layer_norm(x, w, b, r, 1e-5)
    assert y.dtype == h.dtype == torch.bfloat16
    dx, dr, dw, db = torch.autograd.grad((y.float().square().sum() + h.float().sum()), (x, r, w, b))
    assert (dx.dtype, dr.dtype, dw.dtype, db.dtype) == (torch.bfloat16, torch.float32, torch.float32, torch.float32)
    h_ref = (x.float() + r).bfloat16()
    torch.testing.assert_close(h, h_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y.float(), F.layer_norm(h_ref.float(), (32,), w, b, 1e-5), rtol=2e-2, atol=2e-2)
