"""The dispatcher: "cuda" or "triton" asked for where it cannot run is an error naming why (of its own type,
BackendUnavailable); "auto" on a GPU times every path that can run (with an injected timer here) and keeps the
fastest on disk; without a measurement it tries the fused paths in the default order (GPT2FAST_PREFER_BACKEND
first) and only looks for the CUDA ops when it needs them; on the CPU every op still falls back to its
reference."""
from __future__ import annotations

import pytest
import torch

from gpt2fast import ops
from gpt2fast.ops import _decisions, _dispatch

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


def _linear_cross_entropy(be):
    return ops.linear_cross_entropy(torch.randn(3, 8), torch.randn(8, 8), torch.tensor([1, 2, 3]), backend=be)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("op", [*CASES, "linear_cross_entropy"])
def test_a_backend_that_cannot_run_raises_backend_unavailable(op, backend, cpu_without_interpreter):
    """One exception type for "this backend cannot run here" (the benchmarks skip on it and on nothing else):
    a RuntimeError, so callers that caught the RuntimeError of before still do, with the message that says why."""
    name = "Triton" if backend == "triton" else "CUDA C\\+\\+"
    with pytest.raises(ops.BackendUnavailable, match=f"{op}: the {name} backend cannot run here: ") as caught:
        (CASES.get(op) or _linear_cross_entropy)(backend)
    assert isinstance(caught.value, RuntimeError)
    assert "backend='auto'" in str(caught.value) and "backend='torch'" in str(caught.value)


def test_backend_unavailable_is_exported_and_raised_by_choose_and_adamw():
    from gpt2fast.ops.adamw import AdamW

    assert ops.BackendUnavailable is _dispatch.BackendUnavailable and "BackendUnavailable" in ops.__all__
    with pytest.raises(ops.BackendUnavailable, match="no CUDA C\\+\\+ kernel for this op"):
        _dispatch.choose("op_without_cuda", "cuda", None)
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    with pytest.raises(ops.BackendUnavailable, match="AdamW: the CUDA C\\+\\+ backend cannot run here"):
        AdamW([p], backend="cuda").step()


def test_bad_arguments_are_not_backend_unavailable():
    """Only "cannot run here" has the dedicated type: a wrong backend name or a wrong shape is the caller's
    error, a ValueError, and must not read as a skip."""
    for call in (lambda: CASES["bias_gelu"]("cudnn"),
                 lambda: ops.layer_norm(torch.randn(3, 8), torch.ones(7), torch.zeros(8), backend="cuda")):
        with pytest.raises(ValueError) as caught:
            call()
        assert not isinstance(caught.value, ops.BackendUnavailable)


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


def test_default_order_puts_the_override_first(monkeypatch):
    monkeypatch.delenv("GPT2FAST_PREFER_BACKEND", raising=False)
    assert _dispatch.preferred_order("op_b") == ("triton", "cuda")
    monkeypatch.setenv("GPT2FAST_PREFER_BACKEND", "cuda")
    assert _dispatch.preferred_order("op_b") == ("cuda", "triton")
    monkeypatch.setenv("GPT2FAST_PREFER_BACKEND", "torch")
    assert _dispatch.preferred_order("op_b") == ("torch", "triton", "cuda")
    assert _dispatch.choose("op_b", "auto", None, lambda: None) == "torch"


def test_auto_with_nothing_available_warns_once_with_the_reason():
    _dispatch._warned.discard(("op_d", "no Triton here"))
    with pytest.warns(RuntimeWarning, match="op_d: using the PyTorch reference because no Triton here"):
        assert _dispatch.choose("op_d", "auto", "no Triton here", lambda: "no GPU") == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.choose("op_d", "auto", "no Triton here", lambda: "no GPU") == "torch"


# ------------------------------------------------------------------------------ auto measures (injected timer)
class FakeTimer:
    """Stands in for CUDA events: runs each timed call once (so the path really executes, backward included)
    and reports the milliseconds given for the path that ran, which it learns from the op's run function."""

    def __init__(self, ms):
        self.ms = ms
        self.timed = []
        self.current = None

    def __call__(self, fn, device):
        fn()
        self.timed.append(self.current)
        return self.ms[self.current]


@pytest.fixture
def measuring(tmp_path, monkeypatch):
    """auto measures on CPU tensors with a fake timer, decisions kept in a fresh file."""
    monkeypatch.delenv("GPT2FAST_PREFER_BACKEND", raising=False)
    monkeypatch.setenv(_decisions.ENV, str(tmp_path / "decisions.json"))
    _decisions.forget_for_tests()
    _dispatch._unkept.clear()
    timer = FakeTimer({})
    monkeypatch.setattr(_dispatch, "MEASURE", _dispatch.Measure(timer=timer, devices=("cpu",)))
    yield timer
    _decisions.forget_for_tests()


def _runner(timer, calls):
    def run(path, x):
        timer.current = path
        calls.append(path)
        return x * 2
    return run


def test_auto_times_every_path_that_can_run_and_keeps_the_fastest(measuring, tmp_path):
    measuring.ms = {"cuda": 0.30, "triton": 0.20, "torch": 0.25}
    calls = []
    x = torch.randn(4, 8)
    run = _runner(measuring, calls)
    assert _dispatch.choose("op_m", "auto", None, lambda: None, (x,), run=run) == "triton"
    assert sorted(measuring.timed) == ["cuda", "torch", "triton"]
    # the decision is on disk, with the times, under a key naming device, versions, op, dtype, bucket
    saved = _decisions.read(tmp_path / "decisions.json")
    (key, entry), = saved.items()
    assert entry["backend"] == "triton" and entry["ms"] == {"cuda": 0.30, "triton": 0.20, "torch": 0.25}
    assert key.startswith("cpu|torch ") and "|gpt2fast " in key and "|op_m|float32|4x8|fwd" in key
    # the same key again: no timing
    measuring.timed.clear()
    assert _dispatch.choose("op_m", "auto", None, lambda: None, (torch.randn(3, 7),), run=run) == "triton"
    assert measuring.timed == []
    # another shape bucket, dtype or gradient need is measured on its own
    assert _dispatch.choose("op_m", "auto", None, lambda: None, (torch.randn(64, 8),), run=run) == "triton"
    assert _dispatch.choose("op_m", "auto", None, lambda: None, (x.double(),), run=run) == "triton"
    assert _dispatch.choose("op_m", "auto", None, lambda: None, (x.requires_grad_(),), run=run) == "triton"
    assert len(measuring.timed) == 9 and len(_decisions.read(tmp_path / "decisions.json")) == 4


def test_auto_takes_the_pytorch_peer_when_it_is_fastest_without_a_warning(measuring):
    measuring.ms = {"cuda": 0.30, "triton": 0.20, "torch": 0.10}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.choose("op_p", "auto", None, lambda: None, (torch.randn(4, 8),),
                                run=_runner(measuring, [])) == "torch"


def test_auto_measures_only_the_paths_that_can_run(measuring):
    measuring.ms = {"cuda": 0.10, "triton": 0.20, "torch": 0.30}
    x = torch.randn(4, 8)
    assert _dispatch.choose("op_q", "auto", "no Triton here", lambda: None, (x,),
                            run=_runner(measuring, [])) == "cuda"
    assert sorted(measuring.timed) == ["cuda", "torch"]
    measuring.timed.clear()
    assert _dispatch.choose("op_r", "auto", None, None, (x,), run=_runner(measuring, [])) == "triton"
    assert sorted(measuring.timed) == ["torch", "triton"], "no CUDA kernel for op_r: not timed"


def test_a_decision_that_can_no_longer_run_is_not_taken(measuring):
    measuring.ms = {"cuda": 0.10, "triton": 0.20, "torch": 0.30}
    x = torch.randn(4, 8)
    assert _dispatch.choose("op_s", "auto", None, lambda: None, (x,), run=_runner(measuring, [])) == "cuda"
    measuring.timed.clear()
    assert _dispatch.choose("op_s", "auto", None, lambda: "the CUDA ops failed to build", (x,),
                            run=_runner(measuring, [])) == "triton"
    assert sorted(measuring.timed) == ["torch", "triton"], "the paths that can run are compared"
    measuring.timed.clear()
    assert _dispatch.choose("op_s", "auto", None, lambda: "the CUDA ops failed to build", (x,),
                            run=_runner(measuring, [])) == "triton"
    assert measuring.timed == [], "once per process"
    assert _dispatch.choose("op_s", "auto", None, lambda: None, (x,), run=_runner(measuring, [])) == "cuda", \
        "the kept decision stands when its path is back"


def test_decisions_are_kept_across_processes_and_the_override_wins(measuring, tmp_path):
    measuring.ms = {"cuda": 0.10, "triton": 0.20, "torch": 0.30}
    x = torch.randn(4, 8)
    assert _dispatch.choose("op_t", "auto", None, lambda: None, (x,), run=_runner(measuring, [])) == "cuda"
    _decisions.forget_for_tests()  # as a new process would: the decision comes from the file
    measuring.timed.clear()
    assert _dispatch.choose("op_t", "auto", None, lambda: None, (x,), run=_runner(measuring, [])) == "cuda"
    assert measuring.timed == []
    import os

    os.environ["GPT2FAST_PREFER_BACKEND"] = "triton"
    try:
        assert _dispatch.choose("op_t", "auto", None, lambda: None, (x,), run=_runner(measuring, [])) == "triton"
        assert measuring.timed == []
    finally:
        del os.environ["GPT2FAST_PREFER_BACKEND"]


def test_nothing_is_timed_while_torch_compile_traces(measuring, monkeypatch):
    measuring.ms = {"cuda": 0.10, "triton": 0.20, "torch": 0.30}
    monkeypatch.setattr(_dispatch, "_is_compiling", lambda: True)
    x = torch.randn(4, 8)
    assert _dispatch.choose("op_u", "auto", None, lambda: None, (x,), run=_runner(measuring, [])) == "triton"
    assert measuring.timed == [], "no decision yet: the default order, untimed"
    monkeypatch.setattr(_dispatch, "_is_compiling", lambda: False)
    assert _dispatch.choose("op_u", "auto", None, lambda: None, (x,), run=_runner(measuring, [])) == "cuda"
    monkeypatch.setattr(_dispatch, "_is_compiling", lambda: True)
    measuring.timed.clear()
    assert _dispatch.choose("op_u", "auto", None, lambda: None, (x,), run=_runner(measuring, [])) == "cuda"
    assert measuring.timed == [], "the decision made before tracing is used"


def test_timing_never_touches_the_callers_gradients(measuring):
    """The timed calls run forward and backward on detached copies: the caller's .grad stays empty."""
    measuring.ms = {"triton": 0.2, "torch": 0.1}
    x = torch.randn(5, 8, requires_grad=True)
    grads_seen = []

    def run(path, xc):
        measuring.current = path
        y = xc * 3
        y.register_hook(lambda g: grads_seen.append(path))
        return y

    assert _dispatch.choose("op_v", "auto", None, None, (x,), run=run) == "torch"
    assert sorted(grads_seen) == ["torch", "triton"], "the backward pass was timed too"
    assert x.grad is None


def test_real_ops_choose_by_measurement(measuring, monkeypatch):
    """Every op passes its paths to the measurement; the chosen one is what runs, and its result is right."""
    if _dispatch.triton_import_error() or not _dispatch.triton_interpreting():
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) to run the Triton path on the CPU")

    x = torch.randn(3, 16)
    w, b = torch.randn(16), torch.randn(16)
    seen = []
    monkeypatch.setattr(_dispatch, "MEASURE", _dispatch.Measure(
        timer=lambda fn, device: (fn(), seen.append(1), 0.5 if len(seen) == 1 else 0.1)[-1], devices=("cpu",)))
    y = ops.layer_norm(x, w, b)
    assert len(seen) == 2, "triton and torch timed (no CUDA on the CPU)"
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (16,), w, b))
    entry, = _decisions.read(_decisions.path()).values()
    assert entry["backend"] == "torch" and set(entry["ms"]) == {"triton", "torch"}


def test_a_damaged_decisions_file_is_ignored_with_a_warning_and_never_overwritten(measuring, tmp_path):
    bad = tmp_path / "decisions.json"
    bad.write_text("{not json")
    measuring.ms = {"triton": 0.2, "torch": 0.1}
    with pytest.warns(RuntimeWarning, match="ignoring the backend decisions"):
        assert _dispatch.choose("op_w", "auto", None, None, (torch.randn(2, 2),),
                                run=_runner(measuring, [])) == "torch"
    assert bad.read_text() == "{not json"
    other = tmp_path / "other.json"
    other.write_text('{"format": "something else"}')
    with pytest.warns(RuntimeWarning, match="not a gpt2fast-backend-decisions file"):
        assert _decisions.read(other) == {}
