"""gpt2fast.scaling: power-law fits, reading run folders, and a tiny CPU sweep."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpt2fast import scaling
from gpt2fast.scaling import extrapolate, fit_compute, fit_power_law


def synthetic(alpha, scale, xs, noise, seed=0):
    rng = np.random.default_rng(seed)
    return (scale / xs) ** alpha * np.exp(rng.normal(0, noise, len(xs)))


def test_fit_recovers_a_known_exponent_within_its_ci():
    N = np.geomspace(1e5, 1e9, 12)
    fit = fit_power_law(N, synthetic(0.076, 8.8e13, N, 0.005))
    lo, hi = fit.alpha_ci
    assert lo < 0.076 < hi and hi - lo < 0.01
    assert fit.alpha == pytest.approx(0.076, abs=0.005)
    assert fit.scale == pytest.approx(8.8e13, rel=0.5)
    assert float(extrapolate(fit, 1.5e9)) == pytest.approx((8.8e13 / 1.5e9) ** 0.076, rel=0.02)


def test_exact_data_gives_exact_fit():
    N = np.geomspace(1e6, 1e8, 5)
    fit = fit_power_law(N, (8.8e13 / N) ** 0.076)
    assert fit.alpha == pytest.approx(0.076, rel=1e-9) and fit.scale == pytest.approx(8.8e13, rel=1e-6)
    assert fit.alpha_se == pytest.approx(0, abs=1e-9)


def test_fit_compute_recovers_alpha_c():
    C = np.geomspace(1e15, 1e21, 10)
    fit = fit_compute(C, synthetic(0.050, 3.1e8 * 8.64e19, C, 0.005, seed=1))
    lo, hi = fit.alpha_ci
    assert lo < 0.050 < hi


def test_two_points_fit_without_ci_and_bad_input_errors():
    fit = fit_power_law([1e6, 1e7], [4.0, 3.5])
    assert fit.alpha > 0 and np.isnan(fit.alpha_se)
    with pytest.raises(ValueError, match="at least 2"):
        fit_power_law([1e6], [3.0])
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1e6, -1], [3.0, 2.0])
    with pytest.raises(ValueError, match="equal"):
        fit_power_law([1e6, 1e6], [3.0, 2.0])


def fake_run(folder, n_layer, n_embd, steps, val_loss, batch=4, block=64, layout="json"):
    """A finished run's folder: metrics.jsonl and a checkpoint's trainer state, as trainer_state.json (the
    layout written now) or pickled in trainer_state.pt (by an older gpt2fast)."""
    folder.mkdir(parents=True)
    rows = [{"step": s, "loss": val_loss + 0.5, "lr": 1e-3} for s in range(1, steps + 1)]
    rows[steps // 2]["val_loss"] = val_loss + 1
    rows[-1]["val_loss"] = val_loss
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = folder / f"ckpt_{steps:07d}"
    ckpt.mkdir()
    state = {"step": steps, "config": {"tokens_per_step": 0, "batch_size": batch, "block_size": block},
             "model_config": {"n_layer": n_layer, "n_head": 2, "n_embd": n_embd, "block_size": block,
                              "vocab_size": 50257}}
    if layout == "legacy":
        torch.save(state, ckpt / "trainer_state.pt")
    else:
        from gpt2fast.train import write_trainer_state

        write_trainer_state(ckpt, dict(state, optimizer={}, loader={}, rng={"torch": torch.get_rng_state()}))


@pytest.mark.parametrize("layout", ["json", "legacy"])
def test_fit_reads_run_folders(tmp_path, capsys, layout):
    """Of either checkpoint layout; the older, pickled one through torch's weights-only unpickler."""
    from gpt2fast.compute import Shape

    shapes = [(1, 32), (2, 64), (4, 128), (6, 192)]
    for layers, width in shapes:
        n = Shape(layers, width, 2, seq=64).num_params(non_embedding=True)
        fake_run(tmp_path / "runs" / f"L{layers}", layers, width, 20, float((8.8e13 / n) ** 0.076), layout=layout)
    runs = scaling.find_runs([tmp_path / "runs"])
    assert [r.steps for r in runs] == [20] * 4 and runs[0].tokens == 20 * 4 * 64
    assert runs[0].n_params == Shape(1, 32, 2, seq=64).num_params(non_embedding=True)
    assert runs[0].compute == 6.0 * runs[0].n_params * runs[0].tokens
    png = tmp_path / "fit.png"
    assert scaling.main(["fit", str(tmp_path / "runs"), "--plot", str(png), "--extrapolate", "1e9"]) == 0
    out = capsys.readouterr().out
    assert "alpha = 0.0760" in out and "95% CI" in out and "extrapolated loss" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_errors_are_clear(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert scaling.main(["fit", str(tmp_path / "empty")]) == 2
    assert "no runs" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    assert scaling.main(["fit", str(tmp_path / "r")]) == 2
    assert "no val_loss" in capsys.readouterr().err


def test_fit_drops_a_torn_metrics_line(tmp_path):
    fake_run(tmp_path / "r", 1, 32, 20, 4.0)
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "loss": 4.')  # a crash (or a full disk) mid-line
    with pytest.warns(UserWarning, match=r"metrics.jsonl: its last line is torn"):
        run = scaling.read_run(tmp_path / "r")
    assert run.steps == 20 and run.val_loss == 4.0


def test_tiny_sweep_on_the_cpu(tmp_path, small_shards, capsys):
    common = dict(data=str(small_shards), block_size=32, batch_size=2, max_steps=4, eval_interval=4,
                  eval_batches=1, checkpoint_interval=4, warmup_steps=1, max_minutes=0, device="cpu")
    sweep = {"common": common, "runs": [{"name": "a", "n_layer": 1, "n_embd": 16, "n_head": 2},
                                        {"name": "b", "n_layer": 2, "n_embd": 32, "n_head": 2},
                                        {"name": "c", "model": "gpt2-tiny"}]}
    config = tmp_path / "sweep.json"
    config.write_text(json.dumps(sweep))
    assert scaling.main(["sweep", "--config", str(config), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "L(N) = (N_c / N)^alpha_N" in out
    info = json.loads((tmp_path / "out" / "b" / "run.json").read_text())
    assert info["steps"] == 4 and info["tokens"] == 4 * 2 * 32
    assert (tmp_path / "out" / "scaling.png").is_file()
    from gpt2fast.model import PRESETS

    assert not any(k.startswith("sweep-") for k in PRESETS)
