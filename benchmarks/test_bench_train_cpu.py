"""Training step on the CPU: our GPT-2 beside the plain nanoGPT-style model (``gpt2fast.plain_gpt2``), same
config, weights, batch and AdamW, fp32, in one process.

    pytest benchmarks/test_bench_train_cpu.py --benchmark-only -s

On a CPU every op of ours takes its PyTorch path (SDPA, F.layer_norm after the residual add, F.gelu), so what
is measured is how the model composes them, and above all the loss: ours never materialises fp32 logits for
the padded vocabulary nor keeps log-softmax activations (``ops.linear_cross_entropy`` turns the logits into
their gradient in place), the stock way does. Steps alternate, ours then plain then ours..., and the figure
is the median of the per-pair ratios, so a machine shared with other work slows both sides alike. Goal:
>= 1.1x the plain model's tokens/s at both shapes. Nothing here asserts a speed.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
from bench_results import NOTES, SESSION, Figure, record
from conftest import QUICK

from gpt2fast.model import GPT2, GPT2Config
from gpt2fast.plain_gpt2 import PlainGPT2

SUITE = "train (CPU)"
GOAL = 1.1
# (layers, width, T, B): the two shapes of issue 13; GPT-2's 50,257-token vocabulary.
SHAPES = [(4, 128, 128, 8), (6, 384, 256, 8)]
PAIRS = 2 if QUICK else 9  # alternating (ours, plain) steps timed, after two warm-up steps each
THREADS = 2


def _step(model, opt, x, y):
    _, loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}-C{}-T{}-B{}".format(*s))
def test_cpu_training_step_beside_plain_pytorch(benchmark, shape):
    layers, width, T, B = shape
    group = f"train step on the CPU, {layers} layers x {width}, T={T}, B={B}, fp32"
    benchmark.group = group
    threads = torch.get_num_threads()
    torch.set_num_threads(min(THREADS, threads))
    try:
        config = GPT2Config(n_layer=layers, n_head=max(1, width // 64), n_embd=width, block_size=T)
        torch.manual_seed(0)
        ours = GPT2(config, backend="auto").train()
        plain = PlainGPT2(config).train()
        plain.load_state_dict(ours.state_dict())
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, config.vocab_size, (B, T), generator=g)
        y = torch.randint(0, config.vocab_size, (B, T), generator=g)
        runs = {name: (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
                for name, model in (("ours", ours), ("plain", plain))}
        for model, opt in runs.values():
            for _ in range(2):  # allocator, thread pool, first-touch of the weights
                _step(model, opt, x, y)
        seconds = {"ours": [], "plain": []}
        order = ["ours", "plain"]
        for i in range(PAIRS):
            for name in order if i % 2 == 0 else order[::-1]:
                model, opt = runs[name]
                start = time.perf_counter()
                _step(model, opt, x, y)
                seconds[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    ratios = [p / o for o, p in zip(seconds["ours"], seconds["plain"])]
    ratio = statistics.median(ratios)
    tokens = B * T
    ours_tps = tokens / statistics.median(seconds["ours"])
    plain_tps = tokens / statistics.median(seconds["plain"])
    SESSION["timing"] = SESSION.get("timing") or "CPU: medians of alternating steps"
    record(group, "ours", Figure("ours (GPT2, auto -> torch paths)", ours_tps, "tokens/s", True), goal=GOAL,
           suite=SUITE)
    record(group, "peer", Figure("plain GPT-2 (nanoGPT-style)", plain_tps, "tokens/s", True), suite=SUITE)
    NOTES.append(f"{group}: median of {PAIRS} alternating pairs, ours / plain = {ratio:.3f}x "
                 f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)}), goal >= {GOAL}x")
    benchmark.extra_info.update(ours_tokens_per_s=round(ours_tps), plain_tokens_per_s=round(plain_tps),
                                median_pair_ratio=round(ratio, 3), pairs=PAIRS, threads=THREADS)
    print(f"\n{group}: ours {ours_tps:,.0f} tokens/s, plain {plain_tps:,.0f} tokens/s, "
          f"median pair ratio {ratio:.3f}x")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
