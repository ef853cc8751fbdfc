"""Scaling-law fits: ``python -m gpt2fast.scaling``.

    python -m gpt2fast.scaling sweep --config sweep.json --out runs/      # train a set of small models
    python -m gpt2fast.scaling fit runs/ [more runs...] [--plot fit.png] [--extrapolate 1.5e9]

Fits (Kaplan et al. 2020) L(N) = (N_c / N)^alpha_N and L(C) = (C_c / C)^alpha_C by linear least squares on
log L = alpha * log X_c - alpha * log X; the 95% confidence interval of alpha is alpha +- t_{0.975, n-2} * SE,
SE the slope's standard error from the regression residuals (needs at least 3 runs; with 2 it is NaN).

``fit`` reads each run folder (one with ``metrics.jsonl``; a folder of such folders is searched one level
down): the last ``val_loss`` in metrics.jsonl, the model shape from the latest checkpoint's
``trainer_state.json`` (``model_config``) giving N = non-embedding parameters, and C = 6 * N * D with
D = last step x tokens per step (``run.json`` written by ``sweep`` if present, else the checkpoint's
``config``: tokens_per_step, or batch_size x block_size when that is 0, i.e. one process assumed).

``sweep`` config, JSON::

    {"common": {"data": "", "max_steps": 60, "block_size": 64, "batch_size": 8, "device": "cpu", ...},
     "runs": [{"name": "L2-C32", "n_layer": 2, "n_embd": 32, "n_head": 2},
              {"name": "tiny", "model": "gpt2-tiny"}, ...]}

``common`` and each run take any ``TrainConfig`` setting (``python -m gpt2fast.train --help``); a run may
instead give a custom shape with ``n_layer``/``n_embd``/``n_head``, which the sweep registers as a temporary
model preset (``TrainConfig.model`` takes only a preset name). Each run trains into ``OUT/NAME`` and writes
``run.json``; then the sweep fits and plots what finished. CPU, in a few minutes (the packaged corpus)::

    {"common": {"max_steps": 80, "block_size": 64, "batch_size": 8, "eval_interval": 40, "max_minutes": 0,
                "device": "cpu", "warmup_steps": 10, "lr": 3e-3, "min_lr": 3e-4},
     "runs": [{"name": "L1-C32", "n_layer": 1, "n_embd": 32, "n_head": 2},
              {"name": "L2-C64", "n_layer": 2, "n_embd": 64, "n_head": 2},
              {"name": "L4-C128", "n_layer": 4, "n_embd": 128, "n_head": 4}]}

On a GPU, the same with the gpt2-mini/gpt2 sizes, block_size 1024 and token budgets of 10^8-10^9.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from gpt2fast._io import write_atomic

# two-sided 95% critical values of Student's t, df = 1..30 (beyond: Cornish-Fisher expansion around 1.96)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t_critical_95(df: int) -> float:
    if df < 1:
        return math.nan
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclass
class PowerLaw:
    """L(x) = (scale / x) ** alpha, with a 95% confidence interval for alpha."""
    alpha: float
    scale: float  # N_c or C_c
    alpha_se: float
    alpha_ci: tuple
    n: int
    r2: float

    def __call__(self, x):
        return (self.scale / np.asarray(x, dtype=float)) ** self.alpha

    def __str__(self) -> str:
        lo, hi = self.alpha_ci
        return (f"alpha = {self.alpha:.4f} (95% CI {lo:.4f} .. {hi:.4f}, SE {self.alpha_se:.4f}), "
                f"scale = {self.scale:.3e}, R^2 = {self.r2:.4f}, {self.n} points")


def _fit(x: Sequence[float], loss: Sequence[float], what: str) -> PowerLaw:
    x, loss = np.asarray(x, dtype=float), np.asarray(loss, dtype=float)
    if x.shape != loss.shape or x.ndim != 1:
        raise ValueError(f"{what} and L must be 1-D and of the same length")
    if len(x) < 2:
        raise ValueError(f"need at least 2 points to fit a power law, got {len(x)}")
    if np.any(x <= 0) or np.any(loss <= 0) or not np.all(np.isfinite(x)) or not np.all(np.isfinite(loss)):
        raise ValueError(f"{what} and L must be positive and finite")
    if np.ptp(np.log(x)) == 0:
        raise ValueError(f"all {what} are equal: nothing to fit")
    lx, ly = np.log(x), np.log(loss)
    design = np.stack([np.ones_like(lx), lx], axis=1)
    (intercept, slope), *_ = np.linalg.lstsq(design, ly, rcond=None)
    alpha = -slope
    resid = ly - (intercept + slope * lx)
    n = len(x)
    df = n - 2
    sxx = float(np.sum((lx - lx.mean()) ** 2))
    se = math.sqrt(float(resid @ resid) / df / sxx) if df > 0 else math.nan
    t = t_critical_95(df)
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1 - float(resid @ resid) / ss_tot if ss_tot > 0 else 1.0
    scale = math.exp(intercept / alpha) if alpha != 0 else math.inf
    return PowerLaw(float(alpha), scale, se, (alpha - t * se, alpha + t * se), n, r2)


def fit_power_law(N: Sequence[float], L: Sequence[float]) -> PowerLaw:
    """L(N) = (N_c / N) ** alpha_N (N: non-embedding parameters)."""
    return _fit(N, L, "N")


def fit_compute(C: Sequence[float], L: Sequence[float]) -> PowerLaw:
    """L(C) = (C_c / C) ** alpha_C (C: training FLOPs)."""
    return _fit(C, L, "C")


def extrapolate(fit: PowerLaw, x) -> np.ndarray:
    """Predicted loss at ``x`` (parameters or FLOPs) from a fit."""
    return fit(x)


# -------------------------------------------------------------------------------------- run folders
@dataclass
class Run:
    path: Path
    n_params: int  # non-embedding
    steps: int
    tokens: float
    val_loss: float

    @property
    def compute(self) -> float:
        return 6.0 * self.n_params * self.tokens


def _latest_state(run_dir: Path) -> Optional[dict]:
    """The latest checkpoint's trainer state without its tensors (only its settings are read): from
    trainer_state.json, or a pickled trainer_state.pt of an older gpt2fast through torch's weights-only
    unpickler, which refuses a pickle that would run code."""
    from gpt2fast.train import checkpoint_step, read_trainer_state

    ckpts = sorted((p for p in run_dir.glob("ckpt_*") if checkpoint_step(p) is not None and (
        (p / "trainer_state.json").is_file() or (p / "trainer_state.pt").is_file())), key=checkpoint_step)
    return read_trainer_state(ckpts[-1], tensors=False) if ckpts else None


def read_run(run_dir) -> Run:
    from gpt2fast.compute import Shape

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl")
    from gpt2fast.train import read_metrics

    step, val_loss = 0, None
    for record, _ in read_metrics(metrics):  # a torn last line (a crash mid-write) is dropped with a warning
        step = max(step, int(record.get("step", 0)))
        if record.get("val_loss") is not None:
            val_loss = float(record["val_loss"])
    if val_loss is None:
        raise ValueError(f"{run_dir}: metrics.jsonl has no val_loss")
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    state = _latest_state(run_dir) or {}
    if "n_params" in info:
        n_params = int(info["n_params"])
    elif "model_config" in state:
        n_params = Shape.from_config(state["model_config"]).num_params(non_embedding=True)
    else:
        raise ValueError(f"{run_dir}: no checkpoint (ckpt_*/trainer_state.json) or run.json to read the model from")
    if "tokens_per_step" in info:
        per_step = int(info["tokens_per_step"])
    elif "config" in state:
        cfg = state["config"]
        per_step = int(cfg.get("tokens_per_step") or cfg["batch_size"] * cfg["block_size"])
    else:
        raise ValueError(f"{run_dir}: cannot tell the tokens per step (no run.json or checkpoint config)")
    return Run(run_dir, n_params, step, float(step) * per_step, val_loss)


def find_runs(paths) -> list:
    runs = []
    for p in map(Path, paths):
        if (p / "metrics.jsonl").is_file():
            runs.append(read_run(p))
        elif p.is_dir():
            runs.extend(read_run(q) for q in sorted(p.iterdir()) if (q / "metrics.jsonl").is_file())
        else:
            raise ValueError(f"{p}: not a folder")
    if not runs:
        raise ValueError(f"no runs (folders with metrics.jsonl) in {', '.join(map(str, paths))}")
    return runs


def plot_fits(runs, fit_n: PowerLaw, fit_c: Optional[PowerLaw], path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, xs, fit, label in ((axes[0], [r.n_params for r in runs], fit_n, "non-embedding parameters N"),
                               (axes[1], [r.compute for r in runs], fit_c, "training compute C = 6ND (FLOPs)")):
        ax.scatter(xs, [r.val_loss for r in runs], label="runs")
        if fit is not None:
            grid = np.geomspace(min(xs) / 2, max(xs) * 10, 100)
            ax.plot(grid, fit(grid), "--", label=f"alpha = {fit.alpha:.3f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def fit_runs(paths, plot_path=None, extrapolate_to=(), log=print) -> dict:
    runs = find_runs(paths)
    for r in runs:
        log(f"{r.path}: N = {r.n_params:,}, {r.steps} steps, D = {r.tokens:.3g} tokens, C = {r.compute:.3e}, "
            f"val loss {r.val_loss:.4f}")
    fit_n = fit_power_law([r.n_params for r in runs], [r.val_loss for r in runs])
    log(f"L(N) = (N_c / N)^alpha_N: {fit_n}")
    fit_c = None
    if len({r.compute for r in runs}) > 1:
        fit_c = fit_compute([r.compute for r in runs], [r.val_loss for r in runs])
        log(f"L(C) = (C_c / C)^alpha_C: {fit_c}")
    for n in extrapolate_to:
        log(f"extrapolated loss at N = {n:.3g}: {float(extrapolate(fit_n, n)):.4f}")
    if plot_path:
        log(f"plot: {plot_fits(runs, fit_n, fit_c, plot_path)}")
    return {"runs": runs, "fit_n": fit_n, "fit_c": fit_c}


# -------------------------------------------------------------------------------------------- sweep
def run_sweep(config: dict, out: Path, log=print) -> list:
    from gpt2fast import model as model_module
    from gpt2fast.train import TrainConfig, Trainer, _check_keys

    if not isinstance(config, dict) or not isinstance(config.get("runs"), list) or not config["runs"]:
        raise ValueError("the sweep config needs a non-empty \"runs\" list (and optionally \"common\")")
    common = dict(config.get("common", {}))
    _check_keys("the sweep's common settings", common)
    out = Path(out)
    done = []
    for i, spec in enumerate(config["runs"]):
        spec = dict(spec)
        name = str(spec.pop("name", f"run{i}"))
        shape = {k: spec.pop(k) for k in ("n_layer", "n_embd", "n_head") if k in spec}
        preset = None
        if shape:
            if len(shape) != 3:
                raise ValueError(f"run {name!r}: a custom shape needs all of n_layer, n_embd and n_head")
            preset = f"sweep-{name}"
            model_module.PRESETS[preset] = dict(shape, block_size=max(common.get("block_size", 128),
                                                                       spec.get("block_size", 0)))
            spec["model"] = preset
        _check_keys(f"sweep run {name!r}", spec)
        settings = {**common, **spec, "out_dir": str(out / name)}
        if not settings.get("data"):  # prepare the packaged corpus once for all runs
            settings["data"] = str(out / "data") if (out / "data").is_dir() else ""
        try:
            cfg = TrainConfig(**settings)
            log(f"--- {name}: model {cfg.model}{' ' + str(shape) if shape else ''}, {cfg.max_steps} steps")
            trainer = Trainer(cfg, log=log)
            result = trainer.run()
            if not settings["data"]:  # the trainer prepared the corpus in its own folder: share it
                import shutil

                shutil.copytree(trainer.data_dir, out / "data", dirs_exist_ok=True)
            info = {"name": name, "model": cfg.model, **shape,
                    "n_params": trainer.model.num_params(non_embedding=True),
                    "n_params_total": trainer.model.num_params(), "tokens_per_step": trainer.tokens_per_step,
                    "steps": result["step"], "tokens": result["step"] * trainer.tokens_per_step,
                    "val_loss": result["val_loss"]}
            write_atomic(out / name / "run.json", json.dumps(info, indent=2).encode("utf-8"))
            done.append(out / name)
        finally:
            if preset:
                model_module.PRESETS.pop(preset, None)
    return done


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2fast.scaling", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit L(N) and L(C) to finished runs")
    f.add_argument("runs", nargs="+", help="run folders, or folders of run folders")
    f.add_argument("--plot", default="scaling.png", help="PNG to write (default scaling.png; '' for none)")
    f.add_argument("--extrapolate", type=float, nargs="*", default=[], help="parameter counts to predict at")
    s = sub.add_parser("sweep", help="train the runs of a sweep config, then fit")
    s.add_argument("--config", required=True, help="sweep JSON (see the module docstring)")
    s.add_argument("--out", required=True, help="folder for the runs")
    s.add_argument("--plot", default=None, help="PNG to write (default OUT/scaling.png)")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        if args.command == "fit":
            fit_runs(args.runs, args.plot or None, args.extrapolate)
        else:
            config = json.loads(Path(args.config).read_text(encoding="utf-8"))
            done = run_sweep(config, Path(args.out))
            if len(done) >= 2:
                fit_runs(done, args.plot or Path(args.out) / "scaling.png")
    except (ValueError, FileNotFoundError, RuntimeError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
