"""gpt2fast.ops.attention: the flash-style Triton kernels against a float64 reference.

Tolerance: flash-attention's rule (tests/ops_testing.py): ours may be at most twice as far from the float64
reference as plain PyTorch (``attention_reference``) run in the same low precision. Outputs and all three
input gradients are checked, causal and not, in fp32, fp16 and bf16, on shapes whose T is not a multiple of
the tiles (tails), a single token, and strided views of a fused qkv tensor.

Without a GPU the kernels run under Triton's interpreter (slow), so the CPU shapes are small; the interpreter
uses tiles of 16 and 32 (``INTERPRETER_BLOCKS``) so that even these span several tiles.
"""
from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch
from ops_testing import DEVICE, DTYPES, INTERPRETING, ON_GPU, assert_within_flash_rule, fresh, needs_triton

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
def test_torch_backend_is_the_reference():
    q, k, v = _qkv((2, 2, 9, 32), torch.float32)
    torch.testing.assert_close(attention(q, k, v, causal=True, backend="torch"), attention_reference(q, k, v),
                               rtol=0, atol=0)


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
    torch.testing.assert_close(out, attention_reference(q, k, v), rtol=0, atol=0)
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
    torch.testing.assert_close(out, attention_reference(q, k, v), rtol=0, atol=0)


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
