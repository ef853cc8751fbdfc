"""GPU benchmark of the fused AdamW step (gpt2fast.ops.adamw.AdamW, one CUDA launch per parameter group) against
torch.optim.AdamW's fused and foreach implementations, on GPT-2 124M's parameters in fp32.

    pytest benchmarks/test_bench_adamw.py --benchmark-only -s

The parameters are those of gpt2fast's GPT-2 small (124M, padded vocabulary), in nanoGPT's two groups (weight
decay on matrices only), with random gradients. One optimizer step moves 28 bytes per parameter: read the
parameter, gradient and both moments, write the parameter and both moments (all fp32). Figures: ms per step and
GB/s with its shares of peak and of the measured copy bandwidth. Goal: ours at least as fast as torch's fused
AdamW. Skipped without a CUDA GPU; ours is skipped, with the reason, when the CUDA C++ ops are unavailable.
"""
from __future__ import annotations

import pytest
import torch
from gpu_timing import copy_gb_per_s, needs_gpu, record_figures, report, require_backend, run_benchmark, time_cuda

pytestmark = needs_gpu("the AdamW step is")

SUITE = "adamw"
GROUP = "AdamW step, GPT-2 124M fp32"
HP = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
IMPLS = {"cuda": "ours (cuda)", "fused": "torch AdamW(fused=True)", "foreach": "torch AdamW(foreach=True)"}


@pytest.fixture(scope="module")
def gpt2_params():
    from gpt2fast.model import GPT2, GPT2Config

    model = GPT2(GPT2Config.preset("gpt2"))
    params = [p.detach().cuda().requires_grad_() for p in model.parameters()]
    g = torch.Generator(device="cuda").manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=g) * 1e-3
    return params


def _groups(params):
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


@pytest.mark.parametrize("impl", list(IMPLS))
def test_adamw_step(benchmark, gpt2_params, impl):
    from gpt2fast.ops.adamw import AdamW

    params = [p.detach().clone().requires_grad_() for p in gpt2_params]
    for p, src in zip(params, gpt2_params):
        p.grad = src.grad
    if impl == "cuda":
        require_backend("cuda")
        opt = AdamW(_groups(params), backend="cuda", **HP)
    else:
        opt = torch.optim.AdamW(_groups(params), **HP, **{impl: True})
    n = sum(p.numel() for p in params)
    nbytes = 28 * n
    benchmark.group = GROUP
    ms = time_cuda(opt.step, warmup=3, iters=30)
    figures = report(benchmark, f"{GROUP} [{impl}]", ms, bytes=nbytes, copy_bandwidth=copy_gb_per_s(nbytes))
    role = "ours" if impl == "cuda" else "peer"
    record_figures(GROUP, role, IMPLS[impl], figures, suite=SUITE, goal=1.0, goal_peer=IMPLS["fused"])
    run_benchmark(benchmark, opt.step)
