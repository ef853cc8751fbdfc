"""gpt2fast.compute: FLOPs, time, memory and the command line (no GPU needed)."""
from __future__ import annotations

import dataclasses

import pytest

from gpt2fast import compute
from gpt2fast.compute import Shape, estimate, flops_per_token, main, model_flops_per_token, static_memory


def test_gpt2_xl_10b_tokens_is_about_9e19_flops():
    e = estimate(Shape.from_preset("gpt2-xl"), 10e9, "a100", 8)
    assert e.flops_6nd == pytest.approx(9e19, rel=0.05)
    assert e.flops_exact > e.flops_6nd  # the attention term
    assert e.wall_hours == pytest.approx(e.gpu_hours / 8)
    assert e.gpu_hours == pytest.approx(e.flops_exact / (312e12 * 0.4) / 3600)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "gpt2"])
def test_parameter_and_flop_counts_match_the_model(preset):
    from gpt2fast.model import GPT2, GPT2Config

    model = GPT2(GPT2Config.preset(preset))
    c = model.config
    shape = Shape.from_config(c)
    assert shape.num_params() == model.num_params()
    assert shape.num_params(non_embedding=True) == model.num_params(non_embedding=True)
    # the count the trainer used to make itself, from the model's own parameter count
    from_model = 6 * model.num_params(non_embedding=True) + 6 * c.vocab_size * c.n_embd \
        + 12 * c.n_layer * c.n_embd * c.block_size
    assert flops_per_token(shape)["exact"] == model_flops_per_token(c) == from_model
    assert model_flops_per_token(dataclasses.asdict(c)) == from_model  # a checkpoint's stored model_config


def test_gpt2_124m_flops_per_token():
    """6N + 12*L*C*T as nanoGPT's estimate_mfu counts it for GPT-2 124M at T = 1024: N without the position
    table (85,056,000 in the blocks and final LayerNorm + 38,597,376 of the tied embedding as the output head)."""
    fpt = flops_per_token(Shape.from_preset("gpt2"))
    assert fpt["exact"] == 6 * 123_653_376 + 12 * 12 * 768 * 1024 == 855_166_464
    assert fpt["6N"] == 6 * 124_439_808
    from gpt2fast.model import GPT2Config

    # the attention term follows the sequence trained on, not the context the model could take
    assert model_flops_per_token(GPT2Config.preset("gpt2"), seq=128) == 6 * 123_653_376 + 12 * 12 * 768 * 128


def test_gpt2_124m_mixed_precision_state_is_16_bytes_per_param():
    n = Shape.from_preset("gpt2").num_params()
    assert 124e6 < n < 125e6
    mem = static_memory(n, mixed_precision=True)
    assert mem["total"] == 16 * n and mem["total"] == pytest.approx(2.0e9, rel=0.01)
    assert static_memory(n, mixed_precision=False)["total"] == 16 * n


def test_checkpointing_saves_activation_memory_and_fits_more():
    shape = Shape.from_preset("gpt2-xl")
    assert compute.activation_bytes_per_sequence(shape, True) < compute.activation_bytes_per_sequence(shape, False)
    plain = compute.max_micro_batch(shape, 80e9, checkpointing=False)
    assert 0 < plain < compute.max_micro_batch(shape, 80e9, checkpointing=True)
    assert compute.max_micro_batch(Shape(96, 12288, 96), 80e9, False) == 0  # GPT-3 175B: not on one GPU


def test_chinchilla_budget():
    e = estimate(Shape.from_preset("gpt2"), 1e9)
    assert e.chinchilla_tokens == 20 * e.n_params
    assert e.chinchilla_flops == pytest.approx(6 * e.n_params * 20 * e.n_params)


def test_cli_prints_the_figures(capsys, tmp_path):
    png = tmp_path / "c.png"
    assert main(["--model", "gpt2-xl", "--tokens", "10e9", "--gpu", "a100", "--gpus", "8", "--price", "2",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    for text in ("1,557,611,200", "9.346e+19", "GPU-hours", "cost $", "fits one A100", "Chinchilla",
                 "16 bytes/param", "largest micro-batch"):
        assert text in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_custom_shape(capsys):
    assert main(["--n-layer", "2", "--n-embd", "64", "--n-head", "2", "--vocab", "1000", "--seq", "128",
                 "--tokens", "1e6", "--gpu", "h100"]) == 0
    assert "n_layer=2 n_embd=64 n_head=2 vocab=1000 seq=128" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "1e9", "--gpu", "tpu"], "unknown GPU 'tpu'"),
    (["--tokens", "1e9", "--gpu", "v1000"], "unknown GPU"),
    (["--tokens", "1e9", "--model", "gpt5"], "unknown model 'gpt5'"),
    (["--tokens", "1e9", "--mfu", "1.5"], "--mfu"),
    (["--tokens", "0"], "--tokens"),
    (["--tokens", "1e9", "--n-layer", "2", "--n-embd", "65", "--n-head", "2"], "not divisible"),
])
def test_bad_input_is_a_clear_error(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_planner_and_trainer_read_one_peak_table(monkeypatch):
    import torch

    from gpt2fast import train

    assert compute.GPU_PEAK_FLOPS["V100"] == 125e12 and compute.GPU_PEAK_FLOPS["A100"] == 312e12
    assert compute.GPU_PEAK_FLOPS["H100"] == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert train.peak_flops(torch.device("cuda")) == compute.GPU_PEAK_FLOPS["H100"]


def test_mfu_from_a_benchmark_results_file(capsys, tmp_path):
    from gpt2fast.bench import Figure, Results, Row, write_results

    def train_row(impl, mfu):
        ours = Figure(impl, 500_000.0, "tokens/s", True, shares={"detected": mfu, "H100": mfu})
        return Row("train step GPT-2 124M", ours, Figure("plain", 400_000.0, "tokens/s", True), None, "train")

    path = write_results(tmp_path / "r.json", Results(
        [train_row("ours (eager)", 0.31), train_row("ours (torch.compile)", 0.47),
         Row("attention", Figure("ours (triton)", 1.0, "ms", False, shares={"detected": 0.9}), None, None,
             "attention")],
        {"gpu": "NVIDIA H100 80GB HBM3"}))
    assert compute.measured_mfu(path) == (0.47, f"ours (torch.compile) on NVIDIA H100 80GB HBM3 ({path})")
    assert main(["--model", "gpt2", "--tokens", "1e9", "--gpu", "h100", "--mfu-from", str(path)]) == 0
    out = capsys.readouterr().out
    assert "at 47% MFU (measured: ours (torch.compile) on NVIDIA H100" in out

    empty = write_results(tmp_path / "empty.json", Results([], {}))
    assert main(["--tokens", "1e9", "--mfu-from", str(empty)]) == 2
    assert "holds no measured training-step MFU" in capsys.readouterr().err
    assert main(["--tokens", "1e9", "--mfu-from", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
