"""gpt2fast/ops/_common.py, what every op module shares: the one Triton import, the launch helpers, and the way
the custom operators reach the CUDA extension."""
from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from gpt2fast import ops
from gpt2fast.ops import _common, _cuda_loader, _dispatch


def test_without_the_extension_the_operators_say_why(monkeypatch):
    monkeypatch.setattr(_common, "_MODULE_OVERRIDE", None)
    if _cuda_loader.cuda_ops_status().module is not None:
        pytest.skip("the CUDA ops are available here")
    with pytest.raises(ops.BackendUnavailable, match="the CUDA ops are not available"):
        _common.cuda_module()


def test_the_stand_in_takes_the_extensions_place(monkeypatch):
    standin = object()
    monkeypatch.setattr(_common, "_MODULE_OVERRIDE", standin)
    assert _common.cuda_module() is standin


def test_one_triton_import_for_every_op():
    """The op modules and the dispatcher see the same Triton (or the same reason there is none)."""
    modules = [importlib.import_module(f"gpt2fast.ops.{name}") for name in
               ("attention", "bias_gelu", "cross_entropy", "layer_norm")]
    assert all(m.triton is _common.triton and m.tl is _common.tl for m in modules)
    assert _dispatch.triton_import_error() == _common.TRITON_IMPORT_ERROR
    assert (_common.triton is None) == (_common.TRITON_IMPORT_ERROR is not None)


def test_launch_helpers_on_the_cpu():
    t = torch.zeros(2)
    assert isinstance(_common.device_guard(t), contextlib.nullcontext)
    assert _common.programs_target(t.device) == 4  # the interpreter runs programs one after another
