"""Training-step benchmark on the GPU: our GPT-2 124M step beside a plain nanoGPT-style PyTorch GPT-2
(``gpt2fast.plain_gpt2``: SDPA, fused AdamW, bf16 autocast), eager and under torch.compile, in the same run.

    pytest benchmarks/test_bench_train.py --benchmark-only -s

Micro-batch 32 x 1024, bf16 autocast, fused AdamW, one optimizer step per micro-batch. Reported: tokens/s,
MFU against the GPU's dense bf16 peak (6 N + attention FLOPs per token, ``gpt2fast.compute.model_flops_per_token``;
also against the V100/A100/H100 peaks and a bf16 matmul measured on the spot), and peak memory; ours
(eager and compiled) x the plain model (eager and compiled) are rows of the end-of-session summary, in
tokens/s and in peak memory. Goal on an H100: >= 600K tokens/s (>= 52% MFU) with peak memory no higher than
torch.compile's (measured there with torch 2.11: plain eager 329K, compiled 486K tokens/s, 16 GB).
Also: the first steps' losses of ours and of the plain model from the same weights on the same batches
(the loss curve must stay within 1%). Nothing here asserts a speed.
"""
from __future__ import annotations

import pytest
import torch
from bench_results import NOTES, Figure, record
from gpu_timing import measured_ceilings, needs_gpu, record_figures, report, time_cuda

from gpt2fast.compute import model_flops_per_token
from gpt2fast.model import GPT2, GPT2Config
from gpt2fast.plain_gpt2 import PlainGPT2
from gpt2fast.train import TrainConfig, make_optimizer

# A mark, not a module-level skip: without a GPU the benchmarks are still collected (tools/gpu_session.sh
# --dry-run lists them) and each one is skipped with the reason.
pytestmark = needs_gpu("the training step is")


BATCH, T = 32, 1024
LOSS_STEPS = 200
GOAL_TOKENS_PER_S = 600_000  # on an H100
SUITE = "train"
LABELS = {"plain-eager": "plain GPT-2 (eager)", "plain-compile": "plain GPT-2 (torch.compile)",
          "gpt2fast": "ours (eager)", "gpt2fast-compile": "ours (torch.compile)"}
GROUP = "train step GPT-2 124M, 32 x 1024, bf16"


def _step_fn(model, forward, batches):
    opt = make_optimizer(model, TrainConfig(lr=6e-4), torch.device("cuda"))
    state = {"i": 0}

    def step():
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator(device="cuda").manual_seed(0)
    return [(torch.randint(0, 50257, (BATCH, T), device="cuda", generator=g),
             torch.randint(0, 50257, (BATCH, T), device="cuda", generator=g)) for _ in range(4)]


@pytest.mark.parametrize("impl", ["plain-eager", "plain-compile", "gpt2fast", "gpt2fast-compile"])
def test_training_step_tokens_per_second(benchmark, batches, impl):
    benchmark.group = GROUP
    measured_ceilings(torch.cuda.current_device())  # measured now, not inside the peak-memory window below
    torch.manual_seed(0)
    config = GPT2Config.preset("gpt2")
    model = (PlainGPT2(config) if impl.startswith("plain") else GPT2(config, backend="auto")).cuda()
    forward = torch.compile(model) if impl.endswith("compile") else model
    step = _step_fn(model, forward, batches)
    for _ in range(3):  # compile, autotune, allocate
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = time_cuda(step, warmup=2, iters=10, flush_l2=False)
    peak_gb = torch.cuda.max_memory_allocated() / 1e9
    tokens_per_s = BATCH * T / (ms / 1e3)
    figures = report(benchmark, impl, ms, flops=model_flops_per_token(config, seq=T) * BATCH * T)
    mfu = figures["shares"].get("detected")
    benchmark.extra_info.update(tokens_per_s=round(tokens_per_s), peak_memory_GB=round(peak_gb, 2), mfu=mfu)
    print(f"{impl}: {tokens_per_s:,.0f} tokens/s, MFU {mfu}, peak memory {peak_gb:.1f} GB")
    role = "peer" if impl.startswith("plain") else "ours"
    record_figures(GROUP, role, LABELS[impl], figures, suite=SUITE, value=tokens_per_s, unit="tokens/s",
                   higher_is_better=True)
    record(f"{GROUP}, peak memory", role, Figure(LABELS[impl], peak_gb, "GB", higher_is_better=False),
           goal=1.0 if role == "ours" else None, goal_peer=LABELS["plain-compile"], suite=SUITE)  # <= compile's
    if role == "ours":
        NOTES.append(f"{GROUP}: {LABELS[impl]} {tokens_per_s:,.0f} tokens/s, goal >= {GOAL_TOKENS_PER_S:,} on an H100 "
                     f"({'met' if tokens_per_s >= GOAL_TOKENS_PER_S else 'not met'} here, on "
                     f"{torch.cuda.get_device_name()})")
    benchmark.pedantic(step, rounds=1, iterations=1)


@pytest.fixture(scope="module")
def corpus_batches(tmp_path_factory):
    """LOSS_STEPS batches of real text: ../shared/data/corpus (or the packaged corpus) prepared to shards,
    without near-dedup (this measures training, not the data pipeline, and needs no MinHash library)."""
    from pathlib import Path

    from gpt2fast import data

    corpus = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"
    out = tmp_path_factory.mktemp("shards")
    data.prepare([corpus] if corpus.is_dir() else [], out, data.PrepareOptions(near_dedup=False),
                 log=lambda s: None)
    loader = data.TokenLoader(out, "train", 8, T, seed=1337)
    return [tuple(t.cuda() for t in loader.next_batch()) for _ in range(LOSS_STEPS)]


def test_loss_curve_matches_plain_pytorch(benchmark, corpus_batches):
    benchmark.group = "loss curve vs plain PyTorch"
    torch.manual_seed(0)
    config = GPT2Config.preset("gpt2")
    ours, plain = GPT2(config, backend="auto").cuda(), PlainGPT2(config).cuda()
    plain.load_state_dict(ours.state_dict())
    curves = []
    for model in (ours, plain):
        step = _step_fn(model, model, corpus_batches)
        curves.append([step().item() for _ in range(LOSS_STEPS)])
    worst = max(abs(a - b) / b for a, b in zip(*curves))
    benchmark.extra_info.update(steps=LOSS_STEPS, worst_relative_difference=worst, ours_last=curves[0][-1],
                                plain_last=curves[1][-1])
    print(f"loss curves over {LOSS_STEPS} steps: worst relative difference {worst:.2%}")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert worst <= 0.01
