"""Every test of gpt2fast.ops.attention: the flash-style Triton kernels against a float64 reference.

Tolerance: flash-attention's rule (tests/ops_testing.py): ours may be at most twice as far from the float64
reference as plain PyTorch (``attention_reference``) run in the same low precision. Outputs and all three
input gradients are checked, causal and not, in fp32, fp16 and bf16, on shapes whose T is not a multiple of
the tiles (tails), a single token, and strided views of a fused qkv tensor.

Without a GPU the kernels run under Triton's interpreter (slow), so the CPU shapes are small; the interpreter
uses tiles of 16 and 32 (``INTERPRETER_BLOCKS``) so that even these span several tiles.

Then the CUDA kernels (GPU only), and the CUDA custom operators, checked on the CPU over a stand-in of the
binding (tests/cuda_standin.py).
"""
from __future__ import annotations

import importlib
import math
import warnings

import cuda_standin
import pytest
import torch
import torch.nn.functional as F
from cuda_standin import rand
from ops_testing import (
    DEVICE,
    DTYPES,
    INTERPRETING,
    ON_GPU,
    assert_within_flash_rule,
    cuda_ops_or_skip,
    cuda_randn,
    fresh,
    max_error,
    needs_cuda,
    needs_sm80,
    needs_triton,
)

from gpt2fast.ops import _dispatch
from gpt2fast.ops.attention import attention, attention_reference

# gpt2fast.ops re-exports the function under the module's name, so fetch the module itself.
attention_module = importlib.import_module("gpt2fast.ops.attention")

# (B, H, T, D): one token; T below, between and beyond the interpreter's tiles; every supported head dim.
SHAPES = [(1, 1, 1, 32), (2, 3, 17, 32), (1, 2, 65, 64), (1, 1, 33, 128)]
if ON_GPU:
    SHAPES += [(2, 3, 1025, 64), (16, 12, 1024, 64)]


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _qkv(shape, dtype):
    return tuple(fresh(shape, dtype) for _ in range(3))


def _run(fn, q, k, v, do, causal):
    """Output and (dq, dk, dv) of ``fn`` on detached copies of q, k, v (in their dtype)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, causal=causal)
    grads = torch.autograd.grad(out, leaves, do)
    return out.detach(), grads


def _run_in(dtype, q, k, v, do, causal):
    """``attention_reference`` with every input converted to ``dtype``."""
    cast = [t.detach().to(dtype) for t in (q, k, v)]
    return _run(attention_reference, *cast, do.to(dtype), causal)


def _assert_close(name, ours, lowprec, ref64, q, k, v, do):
    if ref64.abs().max().item() == 0 and ref64.numel():
        # Mathematically zero (dq and dk with a single key: the softmax is constant). Ours is rowsum(dO * V)
        # minus rowsum(dO * O) in fp32, so only the rounding of D-term dot products is left.
        D = q.shape[-1]
        terms = do.abs().max() * v.abs().max() * max(q.abs().max(), k.abs().max()) / math.sqrt(D)
        bound = 4 * D * torch.finfo(torch.float32).eps * terms.item()
        assert ours.abs().max().item() <= bound, f"{name}: {ours.abs().max().item():.3e} should be ~0"
        return
    assert_within_flash_rule(name, ours, lowprec, ref64)


def _check_against_reference(shape, dtype, causal):
    q, k, v = _qkv(shape, dtype)
    do = fresh(shape, dtype, requires_grad=False)
    out, grads = _run(lambda *a, causal: attention(*a, causal=causal, backend="triton"), q, k, v, do, causal)
    ref_out, ref_grads = _run_in(torch.float64, q, k, v, do, causal)
    low_out, low_grads = _run_in(dtype, q, k, v, do, causal)
    assert out.dtype == dtype and out.shape == q.shape
    _assert_close("out", out, low_out, ref_out, q, k, v, do)
    for name, ours, low, ref in zip(("dq", "dk", "dv"), grads, low_grads, ref_grads):
        assert ours.dtype == dtype
        _assert_close(name, ours, low, ref, q, k, v, do)


# ---------------------------------------------------------------------------------------------- accuracy
# fp32 attention (exact fp32 products, no tensor cores) is the slow correctness path: small shapes only, as
# its GPU compiles take the longest and the float64 reference of a large fp32 case dominates the test's time.
CASES = [(shape, dtype) for shape in SHAPES for dtype in DTYPES
         if dtype != torch.float32 or shape[0] * shape[1] * shape[2] <= 4096]


@needs_triton
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape,dtype", CASES, ids=lambda c: _dtype_id(c) if isinstance(c, torch.dtype)
                         else "x".join(map(str, c)))
def test_matches_reference(shape, dtype, causal):
    _check_against_reference(shape, dtype, causal)


@needs_triton
@pytest.mark.skipif(not INTERPRETING, reason="the tiles are chosen by the autotuner on a GPU")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_other_tile_shapes(monkeypatch, causal):
    # The autotuner may pick key tiles wider than query tiles, or the other way round, for each kernel;
    # the default interpreter tiles cover one way, these the other.
    monkeypatch.setitem(attention_module.INTERPRETER_BLOCKS, "fwd", (16, 32))
    monkeypatch.setitem(attention_module.INTERPRETER_BLOCKS, "dkdv", (32, 16))
    monkeypatch.setitem(attention_module.INTERPRETER_BLOCKS, "dq", (16, 32))
    monkeypatch.setitem(attention_module.INTERPRETER_BLOCKS, "delta", 16)
    _check_against_reference((1, 2, 47, 64), torch.float32, causal)
    # Sequences that are whole multiples of both tiles take the unmasked (EVEN_T) path everywhere.
    _check_against_reference((1, 2, 64, 32), torch.float32, causal)


@needs_triton
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_strided_views_of_fused_qkv(causal):
    # q, k, v sliced out of one (B, T, 3, H, D) projection, as a model does: no copies, same numbers.
    B, T, H, D = 2, 40, 3, 64
    qkv = fresh((B, T, 3, H, D), torch.float16)
    q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    assert not q.is_contiguous()
    out = attention(q, k, v, causal=causal, backend="triton")
    # The output is stored (B, T, H, D) like its input, so the model's transpose back to (B, T, H*D) is free.
    assert out.transpose(1, 2).is_contiguous()
    do = fresh((B, T, H, D), torch.float16, requires_grad=False).transpose(1, 2)  # a strided dO as well
    (dqkv,) = torch.autograd.grad(out, qkv, do)

    qc, kc, vc = (t.detach().contiguous().requires_grad_(True) for t in (q, k, v))
    out_c = attention(qc, kc, vc, causal=causal, backend="triton")
    grads_c = torch.autograd.grad(out_c, (qc, kc, vc), do.contiguous())
    torch.testing.assert_close(out, out_c, rtol=0, atol=0)
    for i, g in enumerate(grads_c):
        torch.testing.assert_close(dqkv[:, :, i].permute(0, 2, 1, 3), g, rtol=0, atol=0)


@needs_triton
def test_gradients_are_deterministic():
    # No atomics: dQ has its own kernel, so two backward passes agree bit for bit.
    q, k, v = _qkv((2, 2, 50, 32), torch.float32)
    do = fresh(q.shape, torch.float32, requires_grad=False)
    first = torch.autograd.grad(attention(q, k, v, backend="triton"), (q, k, v), do)
    second = torch.autograd.grad(attention(q, k, v, backend="triton"), (q, k, v), do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_triton
def test_empty_sequence():
    q, k, v = _qkv((2, 3, 0, 32), torch.float32)
    out = attention(q, k, v, backend="triton")
    assert out.shape == (2, 3, 0, 32)
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(g is None or g.shape == q.shape for g in grads)


# ---------------------------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_torch_backend_is_pytorchs_sdpa_within_the_flash_rule(dtype, causal):
    """backend="torch" (and auto's fallback) is PyTorch's own fused attention, SDPA: exactly SDPA, and within
    the flash rule of the float64 reference like every other path."""
    q, k, v = _qkv((2, 2, 9, 32), dtype)
    out = attention(q, k, v, causal=causal, backend="torch")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), rtol=0, atol=0)
    do = fresh(q.shape, dtype, requires_grad=False)
    ours, grads = _run(lambda *a, causal: attention(*a, causal=causal, backend="torch"), q, k, v, do, causal)
    ref_out, ref_grads = _run_in(torch.float64, q, k, v, do, causal)
    low_out, low_grads = _run_in(dtype, q, k, v, do, causal)
    _assert_close("out", ours, low_out, ref_out, q, k, v, do)
    for name, g, low, ref in zip(("dq", "dk", "dv"), grads, low_grads, ref_grads):
        _assert_close(name, g, low, ref, q, k, v, do)


def test_reference_matches_sdpa():
    # The reference itself, against PyTorch's fused attention, in float64.
    q, k, v = (t.double() for t in _qkv((2, 3, 19, 32), torch.float32))
    for causal in (True, False):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(attention_reference(q, k, v, causal=causal), expected)


@needs_triton
def test_unsupported_head_dim_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(_dispatch, "_warned", set())  # the warning is once per reason and process
    q, k, v = _qkv((1, 2, 10, 48), torch.float32)
    with pytest.warns(RuntimeWarning, match="head dim 48"):
        out = attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        attention(q, k, v)


@needs_triton
def test_unsupported_head_dim_with_triton_backend_raises():
    q, k, v = _qkv((1, 2, 10, 48), torch.float32)
    with pytest.raises(RuntimeError, match="head dim 48"):
        attention(q, k, v, backend="triton")


def test_mismatched_inputs_raise_value_error():
    q = fresh((1, 2, 8, 32), torch.float32)
    with pytest.raises(ValueError, match=r"same shape.*k \(1, 2, 9, 32\)"):
        attention(q, fresh((1, 2, 9, 32), torch.float32), q)
    with pytest.raises(ValueError, match="4 dimensions"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="same dtype"):
        attention(q, q.detach().double(), q)
    with pytest.raises(ValueError, match="backend"):
        attention(q, q, q, backend="cuda-please")


def test_cpu_without_triton_falls_back(monkeypatch):
    # Away from the interpreter and the GPU, "auto" takes the reference (CPU tensors).
    if DEVICE != "cpu":
        pytest.skip("on a GPU the Triton path runs")
    monkeypatch.setattr(_dispatch, "triton_interpreting", lambda: False)
    monkeypatch.setattr(_dispatch, "_warned", set())
    q, k, v = _qkv((1, 1, 5, 32), torch.float32)
    with pytest.warns(RuntimeWarning, match="CPU"):
        out = attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=0)


def test_gpu_config_families():
    # The autotuner sees every config and prunes to the family of the launch (dtype, head dim); each family
    # must keep something, and only its own entries.
    pytest.importorskip("triton")
    for kernel, families in attention_module._CONFIGS.items():
        configs = attention_module._configs(kernel)
        for head_dim in attention_module.HEAD_DIMS:
            for dot_prec in ("ieee", "tf32"):
                kept = attention_module._pruner(kernel)(configs, {}, HEAD_DIM=head_dim, DOT_PREC=dot_prec)
                family = families[attention_module._config_family(head_dim, dot_prec)]
                assert kept and sorted((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                                       for c in kept) == sorted(family)


def test_autotune_off_keeps_one_config_per_family(monkeypatch):
    # The test-only switch: GPT2FAST_AUTOTUNE=off leaves the autotuner one config (the family's first), so a
    # GPU test compiles each kernel once per family instead of once per config.
    pytest.importorskip("triton")
    monkeypatch.setenv(attention_module.AUTOTUNE_ENV, "off")
    for kernel, families in attention_module._CONFIGS.items():
        configs = attention_module._configs(kernel)
        for head_dim in attention_module.HEAD_DIMS:
            for dot_prec in ("ieee", "tf32"):
                kept = attention_module._pruner(kernel)(configs, {}, HEAD_DIM=head_dim, DOT_PREC=dot_prec)
                first = families[attention_module._config_family(head_dim, dot_prec)][0]
                assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept] == [first]


# ------------------------------------------------------------------------------------- CUDA kernels (GPU)
# The binding (gpt2fast._cuda_ops) called directly, against float64 references with the flash rule.
CUDA_SHAPES = [(1, 1, 1, 64), (3, 7, 257, 64), (2, 3, 1025, 64), (1, 2, 1023, 128), (2, 12, 1024, 64)]


@pytest.fixture(scope="module")
def cuda_ops():
    return cuda_ops_or_skip()


def _cuda_reference(q, k, v, do, causal, cast):
    """o, dq, dk, dv in `cast` arithmetic (scores and softmax in at least fp32, as SDPA's math path)."""
    qq, kk, vv = (t.detach().to(cast).requires_grad_() for t in (q, k, v))
    T, D = q.shape[-2:]
    s = (qq @ kk.transpose(-2, -1)).to(torch.promote_types(cast, torch.float32)) / D ** 0.5
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    o = torch.softmax(s, -1).to(cast) @ vv
    return (o.detach(), *torch.autograd.grad(o, (qq, kk, vv), do.to(cast)))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cuda_kernels_match_float64_reference(cuda_ops, shape, dtype, causal):
    needs_sm80()
    seed = hash((shape, causal)) % 10_000
    q, k, v, do = (cuda_randn(shape, dtype, seed + i) for i in range(4))
    o, lse = cuda_ops.attention_forward(q, k, v, causal)
    assert o.dtype == dtype and o.shape == q.shape and lse.shape == shape[:3]
    ref = _cuda_reference(q, k, v, do, causal, torch.float64)
    lowp = _cuda_reference(q, k, v, do, causal, dtype)
    assert_within_flash_rule("o", o, lowp[0], ref[0])
    grads = cuda_ops.attention_backward(do, q, k, v, o, lse, causal)
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


@needs_cuda
def test_cuda_strided_views_and_determinism(cuda_ops):
    """q, k, v as slices of one (B, T, 3, H, D) projection are read in place; results land in (B, T, H, D)
    order; the backward gives bitwise the same gradients on every run (no atomics)."""
    needs_sm80()
    B, T, H, D = 2, 300, 4, 64
    qkv = cuda_randn((B, T, 3, H, D), torch.bfloat16, 11)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    do = cuda_randn((B, H, T, D), torch.bfloat16, 12)
    o, lse = cuda_ops.attention_forward(q, k, v, True)
    assert o.stride(1) < o.stride(2), "the output should be stored (B, T, H, D) like its input"
    o_packed, _ = cuda_ops.attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), True)
    assert torch.equal(o, o_packed)
    first = cuda_ops.attention_backward(do, q, k, v, o, lse, True)
    for _ in range(2):
        again = cuda_ops.attention_backward(do, q, k, v, o, lse, True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@needs_cuda
def test_cuda_input_checks(cuda_ops):
    needs_sm80()
    q = torch.randn(1, 2, 8, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        cuda_ops.attention_forward(q.float(), q.float(), q.float(), True)
    with pytest.raises(RuntimeError, match="head dim 32"):
        cuda_ops.attention_forward(q[..., :32], q[..., :32], q[..., :32], True)
    with pytest.raises(RuntimeError, match="must have the same|has shape"):
        cuda_ops.attention_forward(q, q[:, :1], q, True)


@needs_cuda
def test_backend_cuda_matches_float64_reference():
    """attention(backend="cuda") end to end through autograd, against the float64 reference."""
    cuda_ops_or_skip()
    needs_sm80()
    q, k, v, do = (cuda_randn((2, 3, 129, 64), torch.bfloat16, 20 + i).requires_grad_() for i in range(4))
    o = attention(q, k, v, causal=True, backend="cuda")
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    ref = _cuda_reference(q, k, v, do, True, torch.float64)
    lowp = _cuda_reference(q, k, v, do, True, torch.bfloat16)
    for name, got, lp, r in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), lowp, ref):
        assert_within_flash_rule(name, got.detach(), lp, r)


# ------------------------------------------------------------------- CUDA custom operators (CPU stand-in)
# torch.ops.gpt2fast.attention_fwd / attention_bwd over tests/cuda_standin.py's plain-PyTorch binding:
# schemas, fakes (and the layouts they promise), registered backward and tracing, without a GPU.
# (the stand_in fixture, which installs it, is in conftest.py)


def _strided_qkv(B=2, T=9, H=3, D=64):
    qkv = rand(B, T, 3, H, D, requires_grad=False)
    return [qkv[:, :, i].transpose(1, 2).requires_grad_() for i in range(3)]  # (B, T, H, D) storage


def _separate_qkv(B=2, T=9, H=3, D=64):
    """(B, H, T, D) views of (B, T, H, D) tensors, one storage each (opcheck's AOT test wants unaliased inputs)."""
    return [rand(B, T, H, D, requires_grad=False, seed=10 + i).transpose(1, 2).requires_grad_() for i in range(3)]


def _opcheck_args(name):
    q, k, v = _separate_qkv()
    if name == "attention_fwd":
        return q, k, v, True
    o, lse = cuda_standin.StandIn().attention_forward(q.detach(), k.detach(), v.detach(), True)
    return rand(2, 3, 9, 64, requires_grad=False), q.detach(), k.detach(), v.detach(), o, lse, True


@pytest.mark.parametrize("name", ["attention_fwd", "attention_bwd"])
def test_opcheck(stand_in, name):
    cuda_standin.opcheck(name, _opcheck_args(name))


def test_cuda_fake_layouts_match_the_binding(stand_in):
    """Attention results land in the (B, T, H, D) order of their inputs, and the fake says so too."""
    q, k, v = _strided_qkv()
    o, _ = torch.ops.gpt2fast.attention_fwd(q, k, v, True)
    assert o.stride(1) < o.stride(2)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fo, flse = torch.ops.gpt2fast.attention_fwd(fq, fk, fv, True)
    assert fo.stride() == o.stride() and flse.shape == (2, 3, 9)


def test_cuda_operators_give_the_reference_gradients(stand_in):
    q, k, v = _strided_qkv()
    ours = torch.autograd.grad(attention_module._cuda_attention(q, k, v, True).square().sum(), (q, k, v))
    ref = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True).square().sum(), (q, k, v))
    for name, a, e in zip("qkv", ours, ref):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=name)


def test_cuda_operators_compile_without_graph_breaks(stand_in):
    def block(q, k, v):  # as the model calls it: the output transposed back to (B, T, H * D)
        return attention_module._cuda_attention(q, k, v, True).transpose(1, 2).reshape(2, 9, 192).square().mean()

    cuda_standin.compiles_like_eager(block, *_strided_qkv())


def test_cuda_inputs_the_kernels_cannot_read_in_place_are_packed_inside_the_operator(stand_in):
    """Rows of 70 elements (not 16-byte chunks): the operator packs them for the kernel, and the results keep
    the layout the fake promises, so tracing and running agree."""
    q, k, v = (rand(2, 3, 9, 70, requires_grad=False, seed=20 + i)[..., 3:67].requires_grad_() for i in range(3))
    cuda_standin.opcheck("attention_fwd", (q, k, v, False))
    o = attention_module._cuda_attention(q, k, v, False)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
