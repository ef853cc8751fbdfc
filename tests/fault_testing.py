"""Helpers for tests/test_faults.py: a tiny model, the trainer's command line for it, and a child process that
kills or interrupts itself at a named phase of training or of a checkpoint write.

Run as a script it is that child::

    python tests/fault_testing.py --fault=ckpt.weights@6:KILL --threads=2 -- --data=... --out-dir=...

``--fault=PHASE@STEP:SIGNAL`` sends SIGNAL (KILL or INT) to the process itself when the trainer reaches PHASE
(a name passed to gpt2fast.train._reached) at STEP; the arguments after ``--`` go to gpt2fast.train.main. The
exit status is main's (a SIGKILL shows as -9 to the parent).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

# Small enough that a run of a few steps takes well under a second on one core: the 50257-token embedding
# dominates; two layers keep the per-block state (attention, MLP, LayerNorm moments) in every checkpoint.
TINY_MODEL = "fault-tiny"
TINY_SHAPE = dict(n_layer=2, n_head=2, n_embd=16, block_size=16)
HERE = Path(__file__).resolve().parent


def register_tiny_model() -> None:
    from gpt2fast.model import PRESETS

    PRESETS.setdefault(TINY_MODEL, dict(TINY_SHAPE))


def settings(data, out_dir, **overrides) -> dict:
    """The TrainConfig settings of a faulted run: 9 steps, a checkpoint every 3, dropout on (so that the RNG
    state must come back too), only the newest checkpoint kept (so that every save also cleans up)."""
    base = dict(data=str(data), out_dir=str(out_dir), model=TINY_MODEL, block_size=16, batch_size=2, max_steps=9,
                max_minutes=0, eval_interval=3, eval_batches=1, checkpoint_interval=3, keep_checkpoints=1,
                warmup_steps=2, lr=3e-3, min_lr=3e-4, dropout=0.1, device="cpu")
    base.update(overrides)
    return base


def argv(values: dict) -> list:
    shown = {True: "true", False: "false"}
    return [f"--{k.replace('_', '-')}={shown.get(v, v) if isinstance(v, bool) else v}" for k, v in values.items()]


def child_command(train_settings: dict, fault: str = "", threads: int = 1) -> list:
    return [sys.executable, str(HERE / "fault_testing.py"), f"--fault={fault}", f"--threads={threads}", "--",
            *argv(train_settings)]


def run_child(train_settings: dict, fault: str = "", threads: int = 1, timeout: float = 120):
    """Run the trainer in a child process; the CompletedProcess (returncode -9 after a SIGKILL)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(child_command(train_settings, fault, threads), capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=HERE.parent)


def _install_fault(spec: str) -> None:
    from gpt2fast import train

    where, _, sig = spec.partition(":")
    phase, _, step = where.partition("@")
    number = {"KILL": signal.SIGKILL, "INT": signal.SIGINT}[sig or "KILL"]

    def hook(reached: str, at: int) -> None:
        if reached == phase and (not step or at == int(step)):
            os.kill(os.getpid(), number)

    train._fault_hook = hook


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault", default="")
    parser.add_argument("--threads", type=int, default=1)
    args, rest = parser.parse_known_args()
    rest = rest[1:] if rest[:1] == ["--"] else rest
    import torch

    # the parent compares with runs in its own process: the same thread count gives the same float sums
    torch.set_num_threads(args.threads)
    register_tiny_model()
    if args.fault:
        _install_fault(args.fault)
    from gpt2fast import train

    return train.main(rest)


if __name__ == "__main__":
    sys.exit(main())
