"""Every test of gpt2fast.ops.bias_gelu: the Triton kernels against a float64 reference (flash-attention's
tolerance rule), the output and both gradients; dispatch, fallback and argument errors; the CUDA kernels (GPU
only); the CUDA custom operators, checked on the CPU over a stand-in of the binding."""
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
from gpt2fast.ops.bias_gelu import bias_gelu, bias_gelu_reference

bias_gelu_module = importlib.import_module("gpt2fast.ops.bias_gelu")

SHAPES = [(1, 1, 1023), (3, 7, 257), (2, 5, 768), (4, 1600), (2, 3, 3072)] + ([(16384, 3072)] if ON_GPU else [])


def make_inputs(shape, dtype, seed):
    x = fresh(shape, dtype, scale=2.0, seed=seed)  # wide enough to reach both tails of the GELU
    bias = fresh((shape[-1],), dtype, scale=0.5, seed=seed + 1)
    dy = fresh(shape, dtype, requires_grad=False, seed=seed + 2)
    return x, bias, dy


def run(fn, x, bias, dy, cast=None):
    """{"y", "dx", "dbias"} of ``fn`` on fresh leaf copies of the inputs (cast if asked)."""
    x, bias = (t.detach().to(cast or t.dtype, copy=True).requires_grad_() for t in (x, bias))
    y = fn(x, bias)
    dx, dbias = torch.autograd.grad([y], [x, bias], [dy.to(y.dtype)])
    return {"y": y, "dx": dx, "dbias": dbias}


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(shape, dtype):
    x, bias, dy = make_inputs(shape, dtype, seed=hash(shape) % 10_000)
    ours = run(lambda a, b: bias_gelu(a, b, backend="triton"), x, bias, dy)
    torch_lowprec = run(bias_gelu_reference, x, bias, dy)
    ref64 = run(bias_gelu_reference, x, bias, dy, cast=torch.float64)
    for name in ref64:
        assert ours[name].dtype == dtype, (name, ours[name].dtype)
        assert_within_flash_rule(name, ours[name], torch_lowprec[name], ref64[name])


@needs_triton
def test_tails_and_zero():
    """Far tails (the sigmoid saturates: exact 0 and identity), and exactly zero."""
    x = torch.tensor([[-40.0, -12.0, -3.0, 0.0, 3.0, 12.0, 40.0, 1e4]], device=DEVICE)
    bias = torch.zeros(8, device=DEVICE)
    y = bias_gelu(x, bias, backend="triton")
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"))
    dx, = torch.autograd.grad(bias_gelu(x.requires_grad_(), bias, backend="triton").sum(), [x])
    torch.testing.assert_close(dx, torch.autograd.grad(F.gelu(x, approximate="tanh").sum(), [x])[0])
    assert torch.isfinite(dx).all()


@needs_triton
def test_non_contiguous_inputs():
    x = fresh((300, 5), torch.float32, seed=3).t()  # (5, 300), last-dim stride 5
    bias = fresh((300, 2), torch.float32, seed=4)[:, 1]
    dy = fresh((5, 300), torch.float32, requires_grad=False, seed=5)
    assert not (x.is_contiguous() or bias.is_contiguous())
    ours = run(lambda a, b: bias_gelu(a, b, backend="triton"), x, bias, dy)
    ref = run(bias_gelu_reference, x, bias, dy)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], msg=name)


@needs_triton
def test_bias_gradient_is_deterministic():
    inputs = make_inputs((96, 300), torch.float32, seed=6)
    first = run(lambda a, b: bias_gelu(a, b, backend="triton"), *inputs)
    second = run(lambda a, b: bias_gelu(a, b, backend="triton"), *inputs)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@needs_triton
def test_empty_batch():
    x = torch.empty(0, 64, device=DEVICE, requires_grad=True)
    bias = torch.zeros(64, device=DEVICE, requires_grad=True)
    y = bias_gelu(x, bias, backend="triton")
    y.sum().backward()
    assert y.shape == x.shape and torch.equal(bias.grad, torch.zeros_like(bias))


# ------------------------------------------------------------------------------------------------- dispatch
def test_torch_backend_is_the_reference():
    x, bias, _ = make_inputs((3, 7, 257), torch.float32, seed=20)
    assert torch.equal(bias_gelu(x, bias, backend="torch"), F.gelu(x + bias, approximate="tanh"))
    assert torch.equal(bias_gelu_reference(x, bias), F.gelu(x + bias, approximate="tanh"))


def test_auto_falls_back_on_cpu_with_one_warning(cpu_without_interpreter):
    if _dispatch.triton_import_error():
        pytest.skip("Triton is not installed: the reason is a different one")
    x, bias = torch.randn(4, 64), torch.randn(64)
    with pytest.warns(RuntimeWarning, match="bias_gelu: using the PyTorch reference because the tensors are on"):
        y = bias_gelu(x, bias)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        y2 = bias_gelu(x, bias)
    assert torch.equal(y, bias_gelu_reference(x, bias)) and torch.equal(y2, y)


def test_triton_backend_that_cannot_run_says_why(cpu_without_interpreter):
    with pytest.raises(RuntimeError, match="bias_gelu: the Triton backend cannot run here: .*(CPU|not importable)"):
        bias_gelu(torch.randn(4, 64), torch.randn(64), backend="triton")


def test_unsupported_dtype_falls_back(monkeypatch):
    monkeypatch.setattr(_dispatch, "_warned", set())
    x = torch.randn(4, 64, dtype=torch.float64, device=DEVICE)
    bias = torch.randn(64, dtype=torch.float64, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="float64"):
        y = bias_gelu(x, bias)
    assert torch.equal(y, bias_gelu_reference(x, bias))


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend='cuda!' is not one of"):
        bias_gelu(torch.randn(4, 64), torch.randn(64), backend="cuda!")


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_mismatched_bias_shape(backend):
    x = torch.randn(2, 3, 64)
    with pytest.raises(ValueError, match=r"bias has shape \(63,\) but x has shape \(2, 3, 64\)"):
        bias_gelu(x, torch.randn(63), backend=backend)
    with pytest.raises(ValueError, match=r"bias has shape \(3, 64\) but x has shape \(2, 3, 64\)"):
        bias_gelu(x, torch.randn(3, 64), backend=backend)


# ------------------------------------------------------------------------------------- CUDA kernels (GPU)
# The binding (gpt2fast._cuda_ops) called directly, against float64 references with the flash rule.
CUDA_SHAPES = [(1, 1, 1), (3, 7, 256), (4, 1023), (5, 3, 3072), (16384, 3072)]


@pytest.fixture(scope="module")
def cuda_ops():
    return cuda_ops_or_skip()


@needs_cuda
@pytest.mark.parametrize("dtype", cuda_dtypes(), ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_kernels_match_float64_reference(cuda_ops, shape, dtype):
    seed = hash(shape) % 10_000
    x = cuda_randn(shape, dtype, seed)
    bias = cuda_randn((shape[-1],), dtype, seed + 1, 0.5)
    dy = cuda_randn(shape, dtype, seed + 2)

    def reference(cast):
        xx = x.to(cast).requires_grad_()
        bb = bias.to(cast).requires_grad_()
        y = F.gelu(xx + bb, approximate="tanh")
        dx, db = torch.autograd.grad(y, (xx, bb), dy.to(cast))
        return y.detach(), dx, db

    y64, dx64, db64 = reference(torch.float64)
    y_lp, dx_lp, db_lp = reference(dtype)
    y = cuda_ops.bias_gelu_forward(x, bias)
    assert_within_flash_rule("y", y, y_lp, y64)
    dx, db = cuda_ops.bias_gelu_backward(x, bias, dy)
    assert_within_flash_rule("dx", dx, dx_lp, dx64)
    assert_within_flash_rule("dbias", db, db_lp, db64)


@needs_cuda
def test_cuda_input_checks(cuda_ops):
    x, b = torch.randn(4, 8, device="cuda"), torch.zeros(8, device="cuda")
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        cuda_ops.bias_gelu_forward(x.double(), b.double())
    with pytest.raises(RuntimeError, match="last dimension must be contiguous"):
        cuda_ops.bias_gelu_forward(x.t(), torch.zeros(4, device="cuda"))


@needs_cuda
def test_backend_cuda_matches_float64_reference():
    """backend="cuda" end to end (the custom operators and their registered backward), output and both
    gradients, against the float64 reference with the flash rule, on an odd shape in bf16 (fp16 before sm_80)."""
    cuda_ops_or_skip()
    dtype = cuda_dtypes()[-1]
    inputs = [cuda_randn((5, 3, 3077), dtype, 5), cuda_randn((3077,), dtype, 6, 0.5)]

    def outputs(backend, cast=None):
        x, b = (t.detach().to(cast or t.dtype).requires_grad_() for t in inputs)
        out = bias_gelu(x, b, backend=backend).float().square().sum()
        return [out.detach()] + list(torch.autograd.grad(out, (x, b)))

    ours, lowp, ref = outputs("cuda"), outputs("torch"), outputs("torch", torch.float64)
    assert_outputs_within_flash_rule("bias_gelu", ours, lowp, ref)


# ------------------------------------------------------------------- CUDA custom operators (CPU stand-in)
# torch.ops.gpt2fast.bias_gelu_fwd / bias_gelu_bwd over tests/cuda_standin.py's plain-PyTorch binding:
# schemas, fakes, registered backward and tracing, without a GPU.
# (the stand_in fixture, which installs it, is in conftest.py)


OPCHECK_ARGS = {
    "bias_gelu_fwd": lambda: (rand(3, 7, 40), rand(40, seed=7)),
    "bias_gelu_bwd": lambda: (rand(3, 40, requires_grad=False), rand(40, requires_grad=False),
                              rand(3, 40, requires_grad=False, seed=8)),
}


@pytest.mark.parametrize("name", list(OPCHECK_ARGS))
def test_opcheck(stand_in, name):
    cuda_standin.opcheck(name, OPCHECK_ARGS[name]())


def test_cuda_operators_give_the_reference_gradients(stand_in):
    x, bias = rand(4, 5, 24, seed=1), rand(24, seed=9)
    ours = torch.autograd.grad(bias_gelu_module._cuda_bias_gelu(x, bias).square().sum(), (x, bias))
    ref = torch.autograd.grad(F.gelu(x + bias, approximate="tanh").square().sum(), (x, bias))
    for name, a, e in zip(("x", "bias"), ours, ref):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=name)


def test_cuda_operators_compile_without_graph_breaks(stand_in):
    x, bias = rand(2, 9, 192, seed=1), rand(192, seed=5)
    cuda_standin.compiles_like_eager(lambda x, bias: bias_gelu_module._cuda_bias_gelu(x, bias).square().mean(),
                                     x, bias)
