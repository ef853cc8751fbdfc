"""The "cuda" backend in the dispatcher: asked for where it cannot run it is an error naming why; "auto" tries
the fused paths in the measured order (PREFERRED / GPT2FAST_PREFER_BACKEND) and only looks for the CUDA ops when
it needs them; on the CPU every op still falls back to its reference."""
from __future__ import annotations

import pytest
import torch

from gpt2fast import ops
from gpt2fast.ops import _dispatch

CASES = {
    "attention": lambda be: ops.attention(*(torch.randn(1, 2, 5, 64) for _ in range(3)), backend=be),
    "layer_norm": lambda be: ops.layer_norm(torch.randn(3, 8), torch.ones(8), torch.zeros(8), backend=be),
    "bias_gelu": lambda be: ops.bias_gelu(torch.randn(3, 8), torch.zeros(8), backend=be),
    "cross_entropy": lambda be: ops.cross_entropy(torch.randn(3, 8), torch.tensor([1, 2, 3]), backend=be),
}


@pytest.mark.parametrize("op", list(CASES))
def test_cuda_backend_on_cpu_tensors_is_a_clear_error(op):
    with pytest.raises(RuntimeError, match="CUDA C\\+\\+ backend cannot run here: the tensors are not on a CUDA GPU"):
        CASES[op]("cuda")


def test_linear_cross_entropy_cuda_on_cpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="the tensors are not on a CUDA GPU"):
        ops.linear_cross_entropy(torch.randn(3, 8), torch.randn(8, 8), torch.tensor([1, 2, 3]), backend="cuda")


def test_an_op_without_a_cuda_kernel_says_so():
    with pytest.raises(RuntimeError, match="no CUDA C\\+\\+ kernel for this op"):
        _dispatch.choose("op_without_cuda", "cuda", None)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend='cudnn' is not one of"):
        CASES["bias_gelu"]("cudnn")


def test_auto_tries_the_preferred_path_first_and_checks_cuda_lazily(monkeypatch):
    monkeypatch.delenv("GPT2FAST_PREFER_BACKEND", raising=False)
    calls = []

    def cuda_ok():
        calls.append("cuda")
        return None

    assert _dispatch.choose("op_a", "auto", None, cuda_ok) == "triton"
    assert calls == [], "Triton first (no measurement): the CUDA ops must not be looked for"
    assert _dispatch.choose("op_a", "auto", "no Triton here", cuda_ok) == "cuda"
    assert calls == ["cuda"]
    monkeypatch.setenv("GPT2FAST_PREFER_BACKEND", "cuda")
    assert _dispatch.choose("op_a", "auto", None, cuda_ok) == "cuda"
    assert _dispatch.choose("op_a", "auto", None, lambda: "no GPU") == "triton"
    monkeypatch.setenv("GPT2FAST_PREFER_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="GPT2FAST_PREFER_BACKEND='cudnn'"):
        _dispatch.choose("op_a", "auto", None, cuda_ok)


def test_measured_preference_is_per_op_and_architecture(monkeypatch):
    monkeypatch.delenv("GPT2FAST_PREFER_BACKEND", raising=False)
    monkeypatch.setitem(_dispatch.PREFERRED, ("op_b", "sm_90"), "cuda")
    assert _dispatch.preferred_order("op_b", "sm_90") == ("cuda", "triton")
    assert _dispatch.preferred_order("op_b", "sm_80") == ("triton", "cuda")
    assert _dispatch.preferred_order("op_c", "sm_90") == ("triton", "cuda")


def test_auto_with_nothing_available_warns_once_with_the_reason():
    _dispatch._warned.discard(("op_d", "no Triton here"))
    with pytest.warns(RuntimeWarning, match="op_d: using the PyTorch reference because no Triton here"):
        assert _dispatch.choose("op_d", "auto", "no Triton here", lambda: "no GPU") == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.choose("op_d", "auto", "no Triton here", lambda: "no GPU") == "torch"


def test_this_machines_measurement_orders_auto(tmp_path):
    """A preferences file written by `python -m gpt2fast.bench prefer` is read when gpt2fast.ops is imported,
    and beats the shipped table (the environment variable beats both)."""
    import os
    import subprocess
    import sys

    from gpt2fast import backend_prefs

    prefs = tmp_path / "prefs.json"
    backend_prefs.save("sm_90", {"attention": "cuda"}, "test", prefs)
    script = ("from gpt2fast.ops import _dispatch as d; "
              "d.PREFERRED[('attention', 'sm_90')] = 'triton'; "
              "print(d.preferred_order('attention', 'sm_90')[0], d.preferred_order('layer_norm', 'sm_90')[0])")
    env = {**os.environ, backend_prefs.ENV: str(prefs)}
    env.pop("GPT2FAST_PREFER_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["cuda", "triton"], out.stderr
    env["GPT2FAST_PREFER_BACKEND"] = "triton"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["triton", "triton"], out.stderr
