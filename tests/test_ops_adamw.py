"""Every test of gpt2fast.ops.adamw.AdamW: the same steps as torch.optim.AdamW (its PyTorch loop on the CPU; the
fused CUDA launch on a GPU, against torch's fused AdamW), state that round-trips through state_dict, clear
errors; the CUDA kernel called directly (GPU only)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from ops_testing import assert_within_flash_rule, cuda_dtypes, cuda_ops_or_skip, cuda_randn, needs_cuda

from gpt2fast.ops.adamw import AdamW

HP = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)


def make_params(device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7,), (33, 5), (1,), (1023,), (16385,)]
    return [torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in shapes]


def set_grads(params, step, skip=None):
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        p.grad = None if i == skip else torch.randn(p.shape, generator=g).to(p.device, p.dtype)


def groups(params, weight_decay=0.1):
    # nanoGPT's split: decay on matrices, none on vectors
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def test_matches_torch_adamw_on_cpu():
    ours_p, ref_p = make_params(), make_params()
    ours = AdamW(groups(ours_p), backend="torch", **HP)
    ref = torch.optim.AdamW(groups(ref_p), foreach=False, **HP)
    for step in range(1, 6):
        skip = 2 if step == 3 else None  # a parameter without a gradient is left alone that step
        set_grads(ours_p, step, skip)
        set_grads(ref_p, step, skip)
        ours.step()
        ref.step()
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert int(ours.state[ours_p[0]]["step"]) == 5 and int(ours.state[ours_p[2]]["step"]) == 4


def test_state_dict_resumes_exactly():
    params = make_params(seed=3)
    opt = AdamW(groups(params), backend="torch", **HP)
    for step in range(1, 3):
        set_grads(params, step)
        opt.step()
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())  # state_dict() holds the live state tensors
    for step in range(3, 5):
        set_grads(params, step)
        opt.step()
    straight = [p.detach().clone() for p in params]

    again = [p.clone().requires_grad_() for p in saved_params]
    resumed = AdamW(groups(again), backend="torch", **HP)
    resumed.load_state_dict(saved_state)
    for step in range(3, 5):
        set_grads(again, step)
        resumed.step()
    for a, b in zip(again, straight):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr must be"),
    (dict(betas=(0.9, 1.0)), "betas must be"),
    (dict(eps=-1e-8), "eps must be"),
    (dict(weight_decay=-0.1), "weight_decay must be"),
    (dict(backend="triton"), "backend='triton'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW(make_params(), **kwargs)


def test_cuda_backend_on_cpu_tensors_is_an_error_and_auto_falls_back_with_one_warning():
    params = make_params()
    set_grads(params, 1)
    with pytest.raises(RuntimeError, match="CUDA C\\+\\+ backend cannot run here: the tensors are not on a CUDA GPU"):
        AdamW(params, backend="cuda").step()
    opt = AdamW(params, backend="auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from gpt2fast.ops import _dispatch

        _dispatch._warned.discard(("adamw", "the tensors are not on a CUDA GPU (the CUDA C++ kernels need one)"))
        opt.step()
        opt.step()
    messages = [str(c.message) for c in caught if "adamw" in str(c.message)]
    assert len(messages) == 1 and "PyTorch reference" in messages[0], messages


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_path_matches_torch_fused(dtype):
    cuda_ops_or_skip()
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 needs sm_80+")
    ours_p = make_params("cuda", dtype)
    lowp_p = make_params("cuda", torch.float32)  # torch's fused step in fp32, rounded at the end: the peer
    ref_p = [p.detach().double().requires_grad_() for p in make_params("cuda", torch.float32)]
    for p, q in zip(ref_p, ours_p):
        p.data.copy_(q.detach().double())
    for p, q in zip(lowp_p, ours_p):
        p.data.copy_(q.detach().float())
    ours = AdamW(groups(ours_p), backend="cuda", **HP)
    lowp = torch.optim.AdamW(groups(lowp_p), fused=True, **HP)
    ref = torch.optim.AdamW(groups(ref_p), foreach=False, **HP)
    for step in range(1, 4):
        set_grads(ours_p, step)
        for p, q in zip(lowp_p, ours_p):
            p.grad = q.grad.float()
        for p, q in zip(ref_p, ours_p):
            p.grad = q.grad.double()
        ours.step()
        lowp.step()
        ref.step()
    for i, (a, lp, r) in enumerate(zip(ours_p, lowp_p, ref_p)):
        assert_within_flash_rule(f"param{i}", a.detach(), lp.detach().to(dtype), r.detach())


# ------------------------------------------------------------------------------------- CUDA kernel (GPU)
# The binding's adamw_step (gpt2fast._cuda_ops) called directly, against torch's AdamW in float64.
@pytest.fixture(scope="module")
def cuda_ops():
    return cuda_ops_or_skip()


@needs_cuda
@pytest.mark.parametrize("pdtype,gdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32), (torch.float16, torch.float16)],
                         ids=str)
def test_cuda_kernel_matches_torch(cuda_ops, pdtype, gdtype):
    if pdtype == torch.bfloat16 and torch.bfloat16 not in cuda_dtypes():
        pytest.skip("bf16 needs sm_80+")
    sizes = [1, 7, 1023, 16384, 16385, 70001]
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    params = [cuda_randn((n,), torch.float32, n) for n in sizes]
    ours = [p.to(pdtype) for p in params]
    m = [torch.zeros(n, device="cuda") for n in sizes]
    v = [torch.zeros(n, device="cuda") for n in sizes]
    ref = [p.to(pdtype).double().requires_grad_() for p in params]
    lp = [p.to(pdtype).float().requires_grad_() for p in params]
    opt_ref = torch.optim.AdamW(ref, foreach=False, **hp)
    opt_lp = torch.optim.AdamW(lp, foreach=False, **hp)
    for step in range(1, 4):
        grads = [cuda_randn((n,), gdtype, 100 * step + n) for n in sizes]
        cuda_ops.adamw_step(ours, grads, m, v, hp["lr"], *hp["betas"], hp["eps"], hp["weight_decay"], step)
        for r, low, g in zip(ref, lp, grads):
            r.grad, low.grad = g.double(), g.float()
        opt_ref.step()
        opt_lp.step()
    for i, n in enumerate(sizes):
        # torch's fp32 step, rounded to the parameter dtype, is the low-precision peer.
        assert_within_flash_rule(f"param{n}", ours[i], lp[i].detach().to(pdtype), ref[i].detach())


@needs_cuda
def test_cuda_input_checks(cuda_ops):
    w, b = torch.ones(8, device="cuda"), torch.zeros(8, device="cuda")
    with pytest.raises(RuntimeError, match="step must be >= 1"):
        cuda_ops.adamw_step([w], [b], [w.clone()], [w.clone()], 1e-3, 0.9, 0.95, 1e-8, 0.0, 0)
