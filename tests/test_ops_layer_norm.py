"""gpt2fast.ops.layer_norm: the Triton kernels against a float64 reference (flash-attention's tolerance rule),
every output and every gradient; dispatch, fallback and argument errors."""
from __future__ import annotations

import warnings

import pytest
import torch
from ops_testing import DEVICE, DTYPES, ON_GPU, assert_within_flash_rule, fresh, needs_triton

from gpt2fast.ops import _dispatch
from gpt2fast.ops.layer_norm import MAX_WIDTH, layer_norm, layer_norm_reference

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
