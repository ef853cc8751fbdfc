"""Every test of gpt2fast.ops.cross_entropy: cross_entropy and linear_cross_entropy against a float64 reference
(flash-attention's tolerance rule), loss and every gradient; ignore_index, strided logits, target checks,
chunking, dispatch and fallback; the CUDA kernels (GPU only); the CUDA custom operators, checked on the CPU over
a stand-in of the binding."""
from __future__ import annotations

import importlib
import warnings
import zlib

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
    max_error,
    needs_cuda,
    needs_triton,
)

from gpt2fast.ops import _dispatch
from gpt2fast.ops.cross_entropy import (
    cross_entropy,
    cross_entropy_reference,
    default_chunk_size,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

# The package re-exports the function under the module's name, so reach the module itself this way.
ce_module = importlib.import_module("gpt2fast.ops.cross_entropy")

SHAPES = [(1, 1023), (3, 7, 257), (16, 1000), (5, 50257)] + ([(4096, 50257)] if ON_GPU else [])
GRAD_SCALE = 1.7  # the gradient arriving at the loss: checks that backward scales by it


def stable_seed(key) -> int:
    return zlib.crc32(repr(key).encode()) % 10_000


def shape_id(shape):
    return "x".join(map(str, shape))


def make_targets(shape, n_classes, seed, ignore_fraction=0.25, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, n_classes, shape, generator=g)
    ignored = torch.rand(shape, generator=g) < ignore_fraction
    ignored.view(-1)[:1] = False  # at least one row counts (all ignored has its own test)
    return torch.where(ignored, ignore_index, targets).to(DEVICE)


def run_ce(fn, logits, targets, cast=None, view=None, **kwargs):
    """{"loss": (1,), "dlogits": like logits} from ``fn`` on a fresh leaf copy of the logits (cast if asked),
    or on ``view(leaf)`` when a view is given (the gradient is then the leaf's)."""
    x = logits.detach().to(cast or logits.dtype, copy=True).requires_grad_()
    loss = fn(view(x) if view else x, targets, **kwargs)
    (grad,) = torch.autograd.grad(loss, x, torch.tensor(GRAD_SCALE, dtype=loss.dtype, device=loss.device))
    return {"loss": loss.detach().reshape(1), "dlogits": grad}


def torch_in_low_precision(logits, targets, ignore_index=-100):
    """F.cross_entropy straight on the logits' own dtype: the error budget of the flash rule."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


def check_ce(logits, targets, ignore_index=-100, backend="triton", view=None):
    ours = run_ce(cross_entropy, logits, targets, view=view, ignore_index=ignore_index, backend=backend)
    lowprec = run_ce(torch_in_low_precision, logits, targets, view=view, ignore_index=ignore_index)
    ref64 = run_ce(cross_entropy_reference, logits, targets, cast=torch.float64, view=view,
                   ignore_index=ignore_index)
    assert ours["loss"].dtype == torch.float32
    assert ours["dlogits"].dtype == logits.dtype
    for name in ref64:
        assert_within_flash_rule(name, ours[name], lowprec[name], ref64[name])
    return ours


# ------------------------------------------------------------------------------------------- cross_entropy
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_float64_reference(shape, dtype):
    seed = stable_seed(shape)
    logits = fresh(shape, dtype, scale=3.0, seed=seed)
    check_ce(logits, make_targets(shape[:-1], shape[-1], seed + 1))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_classes", [257, 200, 64])
def test_row_walk_with_small_blocks(monkeypatch, dtype, n_classes):
    """Blocks much narrower than the row, so every row goes through the unaligned head, several aligned
    unmasked main blocks and a masked tail, at every alignment a row can start at."""
    monkeypatch.setattr(ce_module, "FORWARD_MAX_BLOCK", 16)
    monkeypatch.setattr(ce_module, "BACKWARD_MAX_BLOCK", 32)
    for block in (16, 32):
        walk = ce_module._walk(n_classes, torch.empty((), dtype=dtype).element_size(), block)
        assert walk["N_MAIN"] >= 1 and walk["N_TAIL"] >= 1, walk
    logits = fresh((11, n_classes), dtype, scale=3.0, seed=n_classes)
    check_ce(logits, make_targets((11,), n_classes, seed=n_classes, ignore_fraction=0.2))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_targets_at_the_edges_of_the_row(dtype):
    """First and last class as targets, in rows starting at every alignment (the head and tail paths)."""
    n_classes = 1003
    logits = fresh((16, n_classes), dtype, scale=2.0, seed=3)
    targets = torch.tensor([0, n_classes - 1] * 8, device=DEVICE)
    check_ce(logits, targets)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ignore_index", [-100, 0, 7])
def test_some_rows_ignored(dtype, ignore_index):
    """ignore_index may also be a valid class (0, 7): rows with that target then count for nothing."""
    logits = fresh((3, 7, 257), dtype, scale=3.0, seed=ignore_index + 200)
    targets = make_targets((3, 7), 257, seed=5, ignore_fraction=0.4, ignore_index=ignore_index)
    ours = check_ce(logits, targets, ignore_index=ignore_index)
    ignored = (targets == ignore_index).reshape(-1)
    assert ignored.any() and not ignored.all()
    grad_of_ignored = ours["dlogits"].reshape(-1, 257)[ignored]
    assert torch.equal(grad_of_ignored, torch.zeros_like(grad_of_ignored))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_all_rows_ignored_gives_nan_like_torch(backend):
    """PyTorch's mean over no rows is 0/0 = nan; we match it, and the gradient is all zeros."""
    logits = fresh((4, 257), torch.bfloat16, seed=6)
    targets = torch.full((4,), -100, device=DEVICE)
    ours = run_ce(cross_entropy, logits, targets, backend=backend)
    stock = run_ce(cross_entropy_reference, logits, targets)
    assert torch.isnan(ours["loss"]).all() and torch.isnan(stock["loss"]).all()
    assert torch.equal(ours["dlogits"], torch.zeros_like(logits))
    assert torch.equal(stock["dlogits"], torch.zeros_like(logits))


@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy, under the interpreter
def test_ignored_rows_holding_inf_get_zero_gradient():
    logits = fresh((3, 100), torch.float32, seed=7)
    with torch.no_grad():
        logits[1, 5] = float("inf")
    targets = torch.tensor([3, -100, 9], device=DEVICE)
    ours = run_ce(cross_entropy, logits, targets, backend="triton")
    assert torch.equal(ours["dlogits"][1], torch.zeros(100, device=DEVICE))
    assert torch.isfinite(ours["loss"]).all()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,padded", [((6, 257), 320), ((2, 5, 257), 264), ((3, 1000), 1003)],
                         ids=["2d-pad-to-320", "3d-pad-to-264", "2d-pad-to-1003"])
def test_sliced_logits_run_without_a_copy(monkeypatch, dtype, shape, padded):
    """``padded[..., :V]`` (the model hides its vocabulary padding this way) reaches the kernel as is, and the
    gradient reaches the padded tensor with zeros in the padding."""
    n_classes = shape[-1]
    storage = fresh(shape[:-1] + (padded,), dtype, scale=3.0, seed=padded)
    targets = make_targets(shape[:-1], n_classes, seed=8)
    seen = []
    launch = ce_module._launch_forward

    def spy(x, *args, **kwargs):
        seen.append(x.stride())
        return launch(x, *args, **kwargs)

    monkeypatch.setattr(ce_module, "_launch_forward", spy)

    def sliced(leaf):
        return leaf[..., :n_classes]

    ours = check_ce(storage, targets, view=sliced)
    assert seen == [(padded, 1)]  # the kernel saw the padded layout: no copy
    assert torch.equal(ours["dlogits"][..., n_classes:], torch.zeros_like(ours["dlogits"][..., n_classes:]))


@needs_triton
def test_other_layouts():
    """Columns with a stride (a transpose) and rows that overlap (an expand) are copied, and still right."""
    base = fresh((257, 6), torch.float32, seed=9)
    check_ce(base, make_targets((6,), 257, seed=10), view=lambda b: b.t())
    row = fresh((1, 300), torch.bfloat16, seed=11)
    check_ce(row, make_targets((4,), 300, seed=12, ignore_fraction=0), view=lambda r: r.expand(4, 300))


@needs_triton
def test_one_dimensional_logits():
    logits = fresh((50,), torch.float32, seed=13)
    check_ce(logits, torch.tensor(7, device=DEVICE))


@needs_triton
def test_empty_batch():
    logits = torch.zeros(0, 64, device=DEVICE, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    loss = cross_entropy(logits, targets, backend="triton")
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits, targets))
    loss.backward()
    assert logits.grad.shape == (0, 64)


@needs_triton
def test_int32_targets_accepted():
    logits = fresh((5, 40), torch.float32, seed=14)
    targets = make_targets((5,), 40, seed=15)
    ours = cross_entropy(logits, targets.to(torch.int32), backend="triton")
    torch.testing.assert_close(ours, cross_entropy_reference(logits, targets))


def test_torch_backend_is_the_reference():
    logits = fresh((3, 7, 257), torch.bfloat16, seed=16)
    targets = make_targets((3, 7), 257, seed=17)
    ours = cross_entropy(logits, targets, backend="torch")
    assert torch.equal(ours, F.cross_entropy(logits.reshape(-1, 257).float(), targets.reshape(-1)))


# ------------------------------------------------------------------------------------------ target checks
BACKENDS = ["auto", "torch", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [257, 300, -1, -101])
def test_out_of_range_target_names_value_and_position(backend, bad):
    logits = fresh((2, 3, 257), torch.float32, seed=18)
    targets = make_targets((2, 3), 257, seed=19, ignore_fraction=0)
    targets[1, 2] = bad
    with pytest.raises(ValueError, match=rf"cross_entropy: target {bad} at position \(1, 2\) is out of range: "
                                         rf"targets must lie in \[0, 257\) .* or equal ignore_index=-100"):
        cross_entropy(logits, targets, backend=backend)


def test_out_of_range_reports_the_first_and_the_count():
    logits = torch.zeros(6, 10, device=DEVICE)
    targets = torch.tensor([0, 10, -100, 11, 3, -2], device=DEVICE)
    with pytest.raises(ValueError, match=r"target 10 at position \(1,\) .*\(3 bad targets in all\)"):
        cross_entropy(logits, targets)


def test_ignore_index_may_lie_outside_the_classes():
    logits = fresh((4, 10), torch.float32, seed=20)
    targets = torch.tensor([1, 10, 2, 10], device=DEVICE)
    torch.testing.assert_close(cross_entropy(logits, targets, ignore_index=10),
                               F.cross_entropy(logits, targets, ignore_index=10))


@needs_triton
def test_unvalidated_bad_target_gives_nan_not_a_crash():
    """validate=False skips the host check (and its sync): the kernels never read out of bounds, and the bad
    row's loss and gradient are nan so the mistake still shows."""
    logits = fresh((3, 50), torch.float32, seed=21)
    targets = torch.tensor([1, 50, 2], device=DEVICE)
    out = run_ce(cross_entropy, logits, targets, backend="triton", validate=False)
    assert torch.isnan(out["loss"]).all()
    assert torch.isnan(out["dlogits"][1]).all() and torch.isfinite(out["dlogits"][[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_shape_and_dtype_errors(backend):
    logits = torch.zeros(4, 10, device=DEVICE)
    targets = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=r"targets have shape \(5,\) but logits have shape \(4, 10\); targets must "
                                         r"have shape \(4,\)"):
        cross_entropy(logits, torch.zeros(5, dtype=torch.int64, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match=r"targets have shape \(4, 1\)"):
        cross_entropy(logits, targets[:, None], backend=backend)
    with pytest.raises(ValueError, match="targets must be integer class indices, got torch.float32"):
        cross_entropy(logits, targets.float(), backend=backend)
    with pytest.raises(ValueError, match="logits must be floating point"):
        cross_entropy(targets[:, None].expand(4, 10), targets, backend=backend)
    with pytest.raises(ValueError, match=r"logits have no classes"):
        cross_entropy(logits[:, :0], targets, backend=backend)
    with pytest.raises(ValueError, match=r"targets have shape \(5,\)"):
        cross_entropy_reference(logits, torch.zeros(5, dtype=torch.int64, device=DEVICE))


# ---------------------------------------------------------------------------------------------- dispatch
def test_auto_falls_back_on_cpu_with_one_warning(cpu_without_interpreter):
    if _dispatch.triton_import_error():
        pytest.skip("Triton is not installed: the reason is a different one")
    logits, targets = torch.randn(4, 30), torch.tensor([1, 2, -100, 29])
    with pytest.warns(RuntimeWarning, match="cross_entropy: using the PyTorch reference because the tensors "
                                            "are on the CPU"):
        loss = cross_entropy(logits, targets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        again = cross_entropy(logits, targets)
    assert torch.equal(loss, cross_entropy_reference(logits, targets)) and torch.equal(again, loss)
    hidden, weight = torch.randn(4, 8), torch.randn(30, 8)
    with pytest.warns(RuntimeWarning, match="linear_cross_entropy: using the PyTorch reference because"):
        loss = linear_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(loss, linear_cross_entropy_reference(hidden, weight, targets))


def test_triton_backend_that_cannot_run_says_why(cpu_without_interpreter):
    logits, targets = torch.randn(4, 30), torch.tensor([1, 2, 3, 4])
    with pytest.raises(RuntimeError, match="cross_entropy: the Triton backend cannot run here: .*(CPU|not importable)"):
        cross_entropy(logits, targets, backend="triton")
    with pytest.raises(RuntimeError, match="linear_cross_entropy: the Triton backend cannot run here"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(30, 8), targets, backend="triton")


def test_float64_falls_back(monkeypatch):
    monkeypatch.setattr(_dispatch, "_warned", set())
    logits = fresh((4, 30), torch.float64, seed=22)
    targets = make_targets((4,), 30, seed=23)
    if _dispatch.why_not_triton([logits.float()]) is None:  # Triton could run but for the dtype
        with pytest.raises(RuntimeError, match="dtype torch.float64 is not supported"):
            cross_entropy(logits, targets, backend="triton")
        with pytest.warns(RuntimeWarning, match="dtype torch.float64 is not supported"):
            loss = cross_entropy(logits, targets)
    else:
        loss = cross_entropy(logits, targets, backend="torch")
    assert torch.equal(loss, F.cross_entropy(logits, targets))


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend='cuda!' is not one of"):
        cross_entropy(torch.randn(2, 5), torch.tensor([0, 1]), backend="cuda!")
    with pytest.raises(ValueError, match="backend='cuda!' is not one of"):
        linear_cross_entropy(torch.randn(2, 3), torch.randn(5, 3), torch.tensor([0, 1]), backend="cuda!")


# ------------------------------------------------------------------------------------ linear_cross_entropy
def run_linear(fn, hidden, weight, targets, cast=None, **kwargs):
    """{"loss", "dhidden", "dweight"} from ``fn`` on fresh leaf copies (cast if asked)."""
    h = hidden.detach().to(cast or hidden.dtype, copy=True).requires_grad_()
    w = weight.detach().to(cast or weight.dtype, copy=True).requires_grad_()
    loss = fn(h, w, targets, **kwargs)
    dh, dw = torch.autograd.grad(loss, (h, w), torch.tensor(GRAD_SCALE, dtype=loss.dtype, device=loss.device))
    return {"loss": loss.detach().reshape(1), "dhidden": dh, "dweight": dw}


def linear_in_low_precision(hidden, weight, targets, ignore_index=-100):
    return torch_in_low_precision(hidden @ weight.T, targets, ignore_index)


LINEAR_CASES = [  # hidden shape, V, chunk_size
    ((37, 16), 103, None),  # default: 32 rows, then 5
    ((37, 16), 103, 8),     # 8 does not divide 37: a short last chunk
    ((37, 16), 103, 1),
    ((37, 16), 103, 64),    # one chunk bigger than the batch
    ((3, 7, 24), 257, 5),   # 3-D hidden
    ((64, 32), 1000, None),
] + ([((4096, 768), 50257, None)] if ON_GPU else [])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden_shape,n_classes,chunk", LINEAR_CASES,
                         ids=[f"{shape_id(s)}-V{v}-chunk{c}" for s, v, c in LINEAR_CASES])
def test_linear_matches_float64_reference(hidden_shape, n_classes, chunk, dtype, backend):
    seed = stable_seed((hidden_shape, n_classes, chunk))
    width = hidden_shape[-1]
    hidden = fresh(hidden_shape, dtype, seed=seed)
    weight = fresh((n_classes, width), dtype, scale=2.0 / width ** 0.5, seed=seed + 1)
    targets = make_targets(hidden_shape[:-1], n_classes, seed=seed + 2)
    ours = run_linear(linear_cross_entropy, hidden, weight, targets, chunk_size=chunk, backend=backend)
    lowprec = run_linear(linear_in_low_precision, hidden, weight, targets)
    stock = run_linear(linear_cross_entropy_reference, hidden, weight, targets)  # fp32 loss of the same logits
    ref64 = run_linear(linear_cross_entropy_reference, hidden, weight, targets, cast=torch.float64)
    assert ours["loss"].dtype == torch.float32
    assert ours["dhidden"].dtype == dtype and ours["dweight"].dtype == dtype
    # The loss's error is mostly the logits' rounding to the input dtype, which every way of computing it in
    # that dtype shares; F.cross_entropy straight on bf16 logits then rounds the loss itself to bf16, which may
    # land nearer the truth or far from it by chance (half an ulp at 8 is 0.016). So the loss's budget is the
    # worse of torch's two low-precision ways; the gradients' (many elements, no such luck) is the direct one.
    budget = dict(lowprec)
    if max_error(stock["loss"], ref64["loss"]) > max_error(lowprec["loss"], ref64["loss"]):
        budget["loss"] = stock["loss"]
    for name in ref64:
        assert_within_flash_rule(name, ours[name], budget[name], ref64[name])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_linear_never_materialises_all_logits(monkeypatch, backend):
    rows = []
    matmul = torch.Tensor.__matmul__

    def spy(a, b):
        out = matmul(a, b)
        if out.dim() == 2 and out.shape[1] == 103:
            rows.append(out.shape[0])
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    hidden, weight = fresh((37, 16), torch.float32, seed=24), fresh((103, 16), torch.float32, seed=25)
    targets = make_targets((37,), 103, seed=26)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=10, backend=backend)
    monkeypatch.undo()
    assert rows == [10, 10, 10, 7]
    torch.testing.assert_close(loss, linear_cross_entropy_reference(hidden, weight, targets))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_linear_all_rows_ignored(backend):
    hidden, weight = fresh((6, 8), torch.float32, seed=27), fresh((20, 8), torch.float32, seed=28)
    targets = torch.full((6,), -100, device=DEVICE)
    out = run_linear(linear_cross_entropy, hidden, weight, targets, chunk_size=4, backend=backend)
    assert torch.isnan(out["loss"]).all() and torch.isnan(linear_cross_entropy_reference(hidden, weight, targets))
    assert torch.equal(out["dhidden"], torch.zeros_like(hidden))
    assert torch.equal(out["dweight"], torch.zeros_like(weight))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_linear_partial_requires_grad_and_no_grad(backend):
    hidden, weight = fresh((9, 8), torch.float32, seed=29), fresh((20, 8), torch.float32, seed=30)
    targets = make_targets((9,), 20, seed=31)
    expected = linear_cross_entropy_reference(hidden, weight, targets)
    (dh_ref,) = torch.autograd.grad(expected, hidden, retain_graph=True)
    (dw_ref,) = torch.autograd.grad(expected, weight)

    w_frozen = weight.detach()
    loss = linear_cross_entropy(hidden, w_frozen, targets, chunk_size=4, backend=backend)
    (dh,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(dh, dh_ref)

    h_frozen = hidden.detach()
    loss = linear_cross_entropy(h_frozen, weight, targets, chunk_size=4, backend=backend)
    (dw,) = torch.autograd.grad(loss, weight)
    torch.testing.assert_close(dw, dw_ref)

    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=4, backend=backend)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected.detach())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_linear_non_contiguous_inputs(backend):
    hidden = fresh((16, 9), torch.float32, seed=32).t()  # (9, 16), column stride 9
    weight = fresh((16, 50 * 2), torch.float32, seed=33)[:, ::2].t()  # (50, 16), both strides odd
    targets = make_targets((9,), 50, seed=34)
    assert not (hidden.is_contiguous() or weight.is_contiguous())
    ours = run_linear(linear_cross_entropy, hidden, weight, targets, chunk_size=4, backend=backend)
    ref = run_linear(linear_cross_entropy_reference, hidden, weight, targets)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], msg=name)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_linear_under_autocast(backend):
    """fp32 hidden and weight under bf16 autocast: computed in bf16, as F.linear would be; fp32 gradients."""
    hidden, weight = fresh((9, 16), torch.float32, seed=35), fresh((50, 16), torch.float32, scale=0.5, seed=36)
    targets = make_targets((9,), 50, seed=37)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ours = run_linear(linear_cross_entropy, hidden, weight, targets, chunk_size=4, backend=backend)
    expected = run_linear(linear_cross_entropy_reference, hidden.bfloat16(), weight.bfloat16(), targets)
    assert ours["dhidden"].dtype == torch.float32 and ours["dweight"].dtype == torch.float32
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name].float(), rtol=2e-2, atol=2e-3, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_argument_errors(backend):
    hidden, weight = torch.zeros(4, 8, device=DEVICE), torch.zeros(20, 8, device=DEVICE)
    targets = torch.tensor([0, 1, 2, 3], device=DEVICE)
    with pytest.raises(ValueError, match=r"linear_cross_entropy: target 20 at position \(2,\) is out of range"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 20, 3], device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match=r"hidden's last dimension must equal weight's second"):
        linear_cross_entropy(hidden, weight[:, :7], targets, backend=backend)
    with pytest.raises(ValueError, match=r"targets have shape \(3,\) but hidden has shape \(4, 8\)"):
        linear_cross_entropy(hidden, weight, targets[:3], backend=backend)
    with pytest.raises(ValueError, match="same dtype"):
        linear_cross_entropy(hidden, weight.half(), targets, backend=backend)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        linear_cross_entropy(hidden, weight, targets, chunk_size=0, backend=backend)


def test_default_chunk_size():
    # GPT-2 small: chunks of at least 2 C rows (their bf16 logits as big as the fp32 grad_weight accumulator).
    assert default_chunk_size(16384, 50257, 768) == 2048
    assert default_chunk_size(1_000_000, 50257, 768) == 16384  # a huge batch: hidden-sized logits (15152 rows)
    assert default_chunk_size(37, 103, 16) == 32
    assert default_chunk_size(5, 10, 768) == 5  # one chunk, never more rows than the batch
    assert default_chunk_size(1, 50257, 768) == 1


# ------------------------------------------------------------------------------------- CUDA kernels (GPU)
# The binding (gpt2fast._cuda_ops) called directly, against float64 references with the flash rule.
@pytest.fixture(scope="module")
def cuda_ops():
    return cuda_ops_or_skip()


@needs_cuda
@pytest.mark.parametrize("dtype", cuda_dtypes(), ids=str)
@pytest.mark.parametrize("rows,n_classes,padded", [(1, 1, 1), (7, 10, 10), (33, 50257, 50304), (64, 50257, 50257)])
def test_cuda_kernels_match_float64_reference(cuda_ops, rows, n_classes, padded, dtype):
    seed = rows * 7 + n_classes
    full = cuda_randn((rows, padded), dtype, seed, 3.0)
    logits = full[:, :n_classes]  # a row stride when padded
    targets = torch.randint(0, n_classes, (rows,), generator=torch.Generator().manual_seed(seed)).cuda()
    if rows > 2:
        targets[::3] = -100
    n_valid = (targets != -100).sum().float()
    scale = (torch.tensor(1.0, device="cuda") / n_valid).reshape(1)

    loss, lse = cuda_ops.cross_entropy_forward(logits, targets, -100)
    ref = F.cross_entropy(logits.double(), targets, ignore_index=-100, reduction="none")
    lp = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")
    assert_within_flash_rule("loss", loss, lp, ref)
    lse_ref = torch.logsumexp(logits.double(), -1)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)

    grad = cuda_ops.cross_entropy_backward(logits, targets, lse, scale, -100, None)
    assert grad.dtype == dtype and grad.stride(0) == logits.stride(0)

    def ref_grad(cast):
        z = logits.detach().to(cast).requires_grad_()
        out = F.cross_entropy(z, targets, ignore_index=-100, reduction="sum") * scale.to(cast)
        return torch.autograd.grad(out, z)[0]

    assert_within_flash_rule("grad", grad, ref_grad(dtype), ref_grad(torch.float64))
    assert (grad[targets == -100] == 0).all()

    in_place = logits.clone()
    cuda_ops.cross_entropy_backward(in_place, targets, lse, scale, -100, in_place)
    assert torch.equal(in_place, grad.contiguous())


@needs_cuda
def test_cuda_bad_target_is_nan(cuda_ops):
    logits = cuda_randn((2, 10), torch.float32, 3)
    loss, lse = cuda_ops.cross_entropy_forward(logits, torch.tensor([3, 11], device="cuda"), -100)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])


@needs_cuda
def test_cuda_input_checks(cuda_ops):
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="int64"):
        cuda_ops.cross_entropy_forward(x, torch.zeros(4, device="cuda", dtype=torch.int32), -100)


@needs_cuda
@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_backend_cuda_matches_float64_reference(op):
    """backend="cuda" end to end (the custom operators; cross_entropy's registered backward, and
    linear_cross_entropy's per-chunk operators), the loss and every gradient, against the float64 reference with
    the flash rule, on odd shapes in bf16 (fp16 before sm_80)."""
    cuda_ops_or_skip()
    dtype = cuda_dtypes()[-1]
    targets = torch.randint(0, 50257, (37,), device="cuda")
    targets[::5] = -100
    if op == "cross_entropy":
        inputs = [cuda_randn((37, 50257), dtype, 7, 3.0)]
        run = lambda be, x: cross_entropy(x, targets, backend=be)
    else:
        inputs = [cuda_randn((37, 768), dtype, 8), cuda_randn((50257, 768), dtype, 9, 0.05)]
        run = lambda be, h, w: linear_cross_entropy(h, w, targets, backend=be)

    def outputs(backend, cast=None):
        leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in inputs]
        out = run(backend, *leaves)
        return [out.detach()] + list(torch.autograd.grad(out, leaves))

    ours, lowp, ref = outputs("cuda"), outputs("torch"), outputs("torch", torch.float64)
    assert_outputs_within_flash_rule(op, ours, lowp, ref)


# ------------------------------------------------------------------- CUDA custom operators (CPU stand-in)
# torch.ops.gpt2fast.cross_entropy_mean / _rows / _grad / _grad_ over tests/cuda_standin.py's plain-PyTorch
# binding: schemas, fakes, registered backward and tracing, without a GPU.
# (the stand_in fixture, which installs it, is in conftest.py)


def _opcheck_args(name):
    logits, targets = rand(6, 11, seed=5), torch.tensor([1, 0, -100, 10, 3, 3])
    padded = rand(6, 16, requires_grad=False, seed=6)[:, :11]  # rows with a stride
    lse, scale = torch.logsumexp(padded, -1), torch.tensor([0.2])
    return {
        "cross_entropy_mean": (logits, targets, -100),
        "cross_entropy_rows": (padded, targets, -100),
        "cross_entropy_grad": (padded, targets, lse, scale, -100),
        "cross_entropy_grad_": (padded.clone(), targets, lse, scale, -100),
    }[name]


@pytest.mark.parametrize("name", ["cross_entropy_mean", "cross_entropy_rows", "cross_entropy_grad",
                                  "cross_entropy_grad_"])
def test_opcheck(stand_in, name):
    cuda_standin.opcheck(name, _opcheck_args(name))


def test_cuda_operators_give_the_reference_gradients(stand_in):
    logits, targets = rand(20, 24, seed=5), torch.randint(0, 24, (20,), generator=torch.Generator().manual_seed(0))
    targets[::4] = -100
    ours = ce_module._cuda_cross_entropy(logits, targets, -100)
    ref = F.cross_entropy(logits, targets, ignore_index=-100)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0],
                               rtol=1e-4, atol=1e-5)


def test_cuda_operators_compile_without_graph_breaks(stand_in):
    logits = rand(18, 192, seed=1)
    targets = torch.randint(0, 192, (18,), generator=torch.Generator().manual_seed(1))
    cuda_standin.compiles_like_eager(lambda x: ce_module._cuda_cross_entropy(x.square(), targets, -100), logits)


def test_linear_cross_entropy_on_the_cuda_operators(stand_in):
    """linear_cross_entropy's per-chunk steps on the CUDA path (cross_entropy_rows, then cross_entropy_grad_
    over the chunk's logits), run on the stand-in: the loss and both gradients of the reference."""
    hidden, weight = rand(10, 16, seed=2), rand(24, 16, seed=3)
    targets = torch.randint(0, 24, (10,), generator=torch.Generator().manual_seed(2))
    targets[::3] = -100
    ours = ce_module._run_linear_cross_entropy("cuda", hidden, weight, targets, -100, chunk=4)
    ref = linear_cross_entropy_reference(hidden, weight, targets)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, e in zip(torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
