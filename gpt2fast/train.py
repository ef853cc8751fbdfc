"""`python -m gpt2fast.train`: train GPT-2.

With no arguments it is the embedded default run: prepare the small corpus shipped in the package, train a
small GPT-2 for a few minutes on the CPU (or the GPU if there is one), report validation loss against the
corpus's unigram entropy, save a checkpoint and the loss curve under ./out/, and print a sample.

    python -m gpt2fast.train                                   # the default run
    python -m gpt2fast.train --preset=gpt2 --data=DIR          # GPT-2 124M on prepared shards
    python -m gpt2fast.train --config=run.json --lr=3e-4       # a config file, then overrides
    python -m gpt2fast.train --resume                          # continue the run in --out-dir exactly
    python -m gpt2fast.train --help                            # every setting with its default
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import typing
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from gpt2fast import packaged_corpus
from gpt2fast._io import (
    ChecksumError,
    DiskFullError,
    atomic_path,
    checksum_entry,
    fsync_dir,
    human_bytes,
    is_disk_full,
    read_checksums,
    verify_checksums,
    write_atomic,
    write_checksums,
)
from gpt2fast.compute import model_flops_per_token
from gpt2fast.devices import idle_cores, pick_device
from gpt2fast.errors import ConfigError, DataError, InputError
from gpt2fast.hardware import detect_gpu
from gpt2fast.ops._dispatch import BackendUnavailable
from gpt2fast.packaged_corpus import VOCAB_FILES


# ------------------------------------------------------------------------------------------ config
def _setting(default, help: str):
    """A TrainConfig field with the line --help shows for it: the command line is built from these fields."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # data
    data: str = _setting("", "prepared shards (python -m gpt2fast.data prepare); empty: prepare the packaged corpus")
    vocab: str = _setting("corpus:2048", "the vocabulary when the packaged corpus is used (no --data): corpus:N, "
                                         "a byte-level BPE of N tokens learned from its training split; gpt2, "
                                         "GPT-2's 50,257 tokens. With --data, the data's own tokenizer")
    out_dir: str = _setting("out", "checkpoints, metrics.jsonl, loss.png")
    # model
    model: str = _setting("gpt2-tiny", "a GPT2Config preset: gpt2, gpt2-medium, gpt2-large, gpt2-xl, gpt2-mini, "
                                       "gpt2-tiny")
    init_from: str = _setting("", "a Hugging Face GPT-2 folder to start from instead of random weights")
    block_size: int = _setting(128, "context length in tokens")
    dropout: float = _setting(0.0, "dropout probability, in [0, 1)")
    backend: str = _setting("auto", "kernels: auto, cuda, triton, torch")
    gradient_checkpointing: bool = _setting(False, "recompute each block's activations in the backward pass: "
                                                   "less memory, more compute")
    compile: bool = _setting(False, "torch.compile the model")
    # optimisation
    batch_size: int = _setting(16, "sequences per micro-batch (per process)")
    tokens_per_step: int = _setting(0, "tokens per optimizer step, all processes; 0: one micro-batch "
                                       "(GPT-2: 524288)")
    max_steps: int = _setting(600, "optimizer steps to train for")
    max_minutes: float = _setting(0, "stop (with a checkpoint) after this much training time; 0: no limit")
    lr: float = _setting(3e-3, "peak learning rate")
    min_lr: float = _setting(3e-4, "reached at max_steps by the cosine decay")
    warmup_steps: int = _setting(30, "steps of linear warmup to lr")
    weight_decay: float = _setting(0.1, "AdamW weight decay, on matrices only; 0: none")
    beta1: float = _setting(0.9, "AdamW beta1")
    beta2: float = _setting(0.95, "AdamW beta2")
    optimizer: str = _setting("torch", "torch: torch.optim.AdamW (fused on CUDA); gpt2fast: ours, one CUDA launch "
                                       "per group")
    grad_clip: float = _setting(1.0, "max global gradient norm; 0 turns clipping off")
    dtype: str = _setting("auto", "auto: bf16 on GPUs that have it, fp16 (loss scaling) on older GPUs, fp32 on "
                                  "the CPU; or float32, bfloat16, float16")
    device: str = _setting("auto", "auto, cpu, cuda, cuda:1...")
    threads: int = _setting(0, "CPU threads for a run on the CPU; 0: as many as there are idle cores when it "
                               "starts (another program's busy core would make every step wait); give a number "
                               "to pin it, e.g. for a bit-exact --resume under a different machine load")
    seed: int = _setting(1337, "seeds the initial weights, the batch order and the samples")
    # evaluation, logging, checkpoints
    tensorboard: bool = _setting(False, "also write the metrics for TensorBoard to out_dir/tensorboard "
                                        "(pip install tensorboard)")
    eval_interval: int = _setting(100, "steps between validation runs")
    eval_batches: int = _setting(8, "micro-batches per validation run")
    sample_interval: int = _setting(0, "steps between samples printed while training; 0: only at the end")
    sample_tokens: int = _setting(60, "tokens per sample")
    checkpoint_interval: int = _setting(200, "steps between checkpoints (one is also written at the end)")
    keep_checkpoints: int = _setting(2, "the last K checkpoints are kept")
    resume: bool = _setting(False, "continue exactly from the latest good checkpoint in out_dir (a damaged one is "
                                   "named, and the one before it used)")
    max_bad_steps: int = _setting(5, "consecutive non-finite losses before giving up")
    # several processes (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK): DDP, or with fsdp=true FSDP
    fsdp: bool = _setting(False, "with several processes: FSDP, which shards parameters, gradients and optimizer "
                                 "state across them (for models that don't fit one GPU), instead of DDP")

    def __post_init__(self):
        for names, valid, requirement, hint in _RANGES:
            for name in names:
                value = getattr(self, name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{flag(name)} must be a finite number, got {value}{hint}")
                if not valid(value):
                    raise ConfigError(f"{flag(name)} must be {requirement}, got {value}{hint}")
        if not self.min_lr <= self.lr:
            raise ConfigError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}: lower --min-lr "
                              f"(the end of the cosine decay) or raise --lr")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.backend not in ("auto", "cuda", "triton", "torch"):
            raise ConfigError(f"--backend must be auto, cuda, triton or torch, got {self.backend!r}")
        if self.optimizer not in ("torch", "gpt2fast"):
            raise ConfigError(f"--optimizer must be torch (torch.optim.AdamW, fused on CUDA) or gpt2fast "
                              f"(gpt2fast.ops.adamw.AdamW: one CUDA launch per group), got {self.optimizer!r}")


# The range of every numeric setting, checked in one place (TrainConfig.__post_init__, so that a config file, the
# command line and a sweep get the same messages): (settings, test, what the value must be, what it means or the
# fix). The model's and the optimizer's own checks then never see a bad value, so no error lacks the flag's name.
_RANGES = (
    (("block_size", "batch_size", "max_steps", "eval_interval", "eval_batches", "checkpoint_interval",
      "keep_checkpoints", "max_bad_steps"), lambda v: v >= 1, "at least 1", ""),
    (("tokens_per_step",), lambda v: v >= 0, ">= 0", " (0: one micro-batch per step)"),
    (("sample_interval",), lambda v: v >= 0, ">= 0", " (0: a sample only at the end)"),
    (("sample_tokens",), lambda v: v >= 0, ">= 0", ""),
    (("warmup_steps",), lambda v: v >= 0, ">= 0", " (0: no warmup)"),
    (("seed",), lambda v: 0 <= v < 2 ** 63, "in [0, 2^63)", ""),
    (("lr",), lambda v: v > 0, "> 0", " (the peak learning rate, e.g. 6e-4)"),
    (("min_lr",), lambda v: v >= 0, ">= 0", " (where the cosine decay ends, at most --lr)"),
    (("dropout",), lambda v: 0 <= v < 1, "in [0, 1)", " (0: no dropout)"),
    (("weight_decay",), lambda v: v >= 0, ">= 0", " (0: no weight decay)"),
    (("beta1", "beta2"), lambda v: 0 <= v < 1, "in [0, 1)", " (AdamW's moment decay rates: 0.9, 0.95)"),
    (("grad_clip",), lambda v: v >= 0, ">= 0", " (0 turns clipping off)"),
    (("max_minutes",), lambda v: v >= 0, ">= 0", " (0: no time limit)"),
    (("threads",), lambda v: v >= 0, ">= 0", " (0: the idle cores)"),
)


PRESETS = {
    "default": {},
    # GPT-2's own recipe, nanoGPT-style: 0.5M tokens per step
    **{name: dict(model=name, vocab="gpt2", block_size=1024, batch_size=batch, tokens_per_step=524_288, lr=lr,
                  min_lr=lr / 10,
                  warmup_steps=700, max_steps=19_073, max_minutes=0, eval_interval=250, eval_batches=20,
                  checkpoint_interval=1000, sample_interval=1000)
       for name, batch, lr in (("gpt2", 32, 6e-4), ("gpt2-medium", 16, 3e-4), ("gpt2-large", 8, 2.5e-4),
                               ("gpt2-xl", 4, 2e-4))},
    "gpt2-mini": dict(model="gpt2-mini", vocab="gpt2", block_size=256, batch_size=16, lr=1e-3, min_lr=1e-4,
                      max_minutes=0),
}


# ------------------------------------------------------------------------------------ command line
def flag(name: str) -> str:
    """A setting's flag as every command line of ours spells it: ``max_steps`` -> ``--max-steps``."""
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


# The one table of setting types: how a value is read from the command line, what an error calls the values it
# takes, and the placeholder --help shows. A JSON config file's values are checked against the same types.
_KINDS = {int: (int, "an integer", "N"), float: (float, "a number", "X"), str: (str, "text", "TEXT"),
          bool: (_parse_bool, "true or false", "BOOL")}


def setting_types() -> Dict[str, type]:
    """Each TrainConfig setting's type, resolved from its annotation (a string under postponed annotations)."""
    return typing.get_type_hints(TrainConfig)


def _reader(kind: type):
    read, takes, _ = _KINDS[kind]

    def convert(text: str):
        try:
            return read(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes {takes}, got {text!r}") from None

    convert.__name__ = kind.__name__  # argparse names a type by it in its own messages
    return convert


def _shown(value) -> str:
    """A default as it would be typed: true/false for booleans, quotes around text (so that '' shows)."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting: parse_args is also called by
    code (the sweeps, the tests), and main prints the message as one line."""

    def error(self, message):
        raise ConfigError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field, help and default from the field. Each setting also takes its older
    spelling with underscores (``--max_steps``), as a flag of its own that --help leaves out, so that errors
    echo the spelling the user typed."""
    parser = _Parser(prog="python -m gpt2fast.train", description=__doc__,
                     usage="python -m gpt2fast.train [--preset NAME] [--config FILE.json] [--SETTING VALUE ...]",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     allow_abbrev=False,  # --max=3 is a typo to report, not --max-steps (or --max-minutes)
                     exit_on_error=False)  # type errors come back as ArgumentError, worded in parse_args
    parser.add_argument("--preset", metavar="NAME", default=argparse.SUPPRESS,
                        help=f"applied first: {', '.join(sorted(PRESETS))} (default: default)")
    parser.add_argument("--config", metavar="FILE.json", default=argparse.SUPPRESS,
                        help="a JSON object of settings (their names with underscores), applied after the preset")
    group = parser.add_argument_group(  # the formatter keeps this text as written, hence the line breaks
        "settings", "--name=value or --name value, applied after the preset and the config file. A boolean alone\n"
                    "means true (--compile). The older spelling with underscores (--max_steps=300) works too.")
    defaults, types = TrainConfig(), setting_types()
    for f in fields(TrainConfig):
        kind = types[f.name]
        bool_options = {"nargs": "?", "const": True} if kind is bool else {}
        shown = f"{f.metadata['help']} (default: {_shown(getattr(defaults, f.name))})".replace("%", "%%")
        spellings = [flag(f.name)] + (["--" + f.name] if "_" in f.name else [])
        for spelling in spellings:
            group.add_argument(spelling, dest=f.name, type=_reader(kind), metavar=_KINDS[kind][2],
                               default=argparse.SUPPRESS, help=shown if spelling == spellings[0] else argparse.SUPPRESS,
                               **bool_options)
    return parser


def help_text() -> str:
    return build_parser().format_help()


def _unknown_setting(name: str, source: str, known: List[str], shown=repr) -> ConfigError:
    """'unknown setting' naming where it came from, with the known names that start like it or look like it."""
    close = [k for k in known if name and k.startswith(name)] + difflib.get_close_matches(name, known, n=3)
    close = list(dict.fromkeys(close))[:3]
    hint = f"; did you mean {', '.join(shown(c) for c in close)}?" if close else "; see --help"
    return ConfigError(f"unknown setting {name!r} in {source}{hint}")


def _check_keys(source: str, keys) -> None:
    """Refuse setting names that TrainConfig lacks (in a config file, a sweep's settings)."""
    known = [f.name for f in fields(TrainConfig)]
    for key in keys:
        if key not in known:
            raise _unknown_setting(key, source, known, shown=lambda c: "--" + c)


def _refuse_extra(arg: str) -> ConfigError:
    """The error for the first argument argparse did not take: a stray word or an unknown (or shortened) flag."""
    if not arg.startswith("-"):
        return ConfigError(f"unexpected argument {arg!r}: settings are written --key=value (see --help)")
    name = arg.lstrip("-").partition("=")[0]
    names = [f.name for f in fields(TrainConfig)] + ["preset", "config"]
    if "_" not in name:  # suggest in the spelling the user chose
        names = [n.replace("_", "-") for n in names]
    return _unknown_setting(name, "the command line", names, shown=lambda c: "--" + c)


# argparse's words for a flag given without its value, as our other messages put it
_ARGPARSE_MESSAGES = {"expected one argument": "needs a value"}


def _read_config_file(config_file: str) -> dict:
    path = Path(config_file)
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot be read ({e})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of settings")
    _check_keys(str(path), loaded)
    types, settings = setting_types(), {}
    for key, value in loaded.items():
        expected = types[key]
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(f"{path}: {key} should be {expected.__name__}, got {value!r}")
        settings[key] = value
    return settings


def parse_args(argv) -> TrainConfig:
    """``--preset NAME`` first, then ``--config FILE.json``, then the settings given, whatever their order."""
    try:
        given, extra = build_parser().parse_known_args(list(argv))
    except argparse.ArgumentError as e:
        if e.argument_name is None:
            raise ConfigError(f"{e.message} (see --help)") from None
        raise ConfigError(f"{e.argument_name} {_ARGPARSE_MESSAGES.get(e.message, e.message)}") from None
    if extra:
        raise _refuse_extra(extra[0])
    overrides = vars(given)
    preset = overrides.pop("preset", "default")
    config_file = overrides.pop("config", None)
    if preset not in PRESETS:
        raise ConfigError(f"unknown --preset {preset!r}; choose one of {sorted(PRESETS)}")
    settings = dict(PRESETS[preset])
    if config_file:
        settings.update(_read_config_file(config_file))
    settings.update(overrides)
    return TrainConfig(**settings)


# ----------------------------------------------------------------------------------------- helpers
def peak_flops(device: torch.device) -> Optional[float]:
    """Dense bf16/fp16 tensor-core peak FLOP/s of the GPU (gpt2fast.hardware's table, which tells an H100 PCIe
    from an SXM), or None (CPU, a GPU not in the table): the MFU is then left out, not guessed."""
    if device.type != "cuda":
        return None
    gpu = detect_gpu(torch.cuda.get_device_name(device))
    return gpu.bf16 * 1e12 if gpu is not None else None


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model, cfg: TrainConfig, device: torch.device):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "gpt2fast":
        from gpt2fast.ops.adamw import AdamW

        return AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def _pick_device(name: str) -> torch.device:
    return pick_device(name, flag="--device")


def pick_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------ checkpoints
# A checkpoint is a folder ckpt_NNNNNNN (N: optimizer steps taken) holding
#   config.json, model.safetensors  the weights, as GPT2.save_pretrained writes them (Hugging Face's layout)
#   trainer_state.safetensors       every tensor of the trainer's state: optimizer moments, RNG states (uint8)
#   trainer_state.json              the rest: step, data position, settings, loss scaler, and the nesting of the
#                                   optimizer's state with each tensor named by its key in the .safetensors file
#   checksums.json                  size and sha256 of the four files above, written last
# No file in it is a pickle, so reading a checkpoint someone sent runs no code. It is written as .tmp_ckpt_N and
# renamed into place once complete; a folder being deleted is first renamed to .del_ckpt_N. So under the name
# ckpt_N there is only ever a complete checkpoint, and a crash at any moment leaves one to resume from.
CHECKPOINT_FILES = ("config.json", "model.safetensors", "trainer_state.safetensors", "trainer_state.json")
LEGACY_STATE = "trainer_state.pt"  # written (pickled) before the layout above; read with weights_only=True
_STATE_FORMAT = "gpt2fast trainer state"
_CHECKPOINT_NAME = re.compile(r"ckpt_(\d{7,})")
# files a checkpoint folder of ours may hold: with only these, an incomplete one is ours to remove
_OUR_FILES = re.compile(r"(config\.json|model\.safetensors|trainer_state\.(safetensors|json|pt)|checksums\.json"
                        r"|\..+\.tmp)")

# Fault injection: tests/fault_testing.py sets this to a function of (phase, step) that kills or interrupts the
# process at one of the phases named in the calls to _reached, to prove that a crash or a Ctrl-C at any of them
# resumes exactly. None outside those tests.
_fault_hook = None


def _reached(phase: str, step: int) -> None:
    if _fault_hook is not None:
        _fault_hook(phase, step)


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:07d}"


def checkpoint_step(path: Path) -> Optional[int]:
    """N of a folder named ckpt_N, else None."""
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def _is_complete(path: Path) -> bool:
    """Whether a checkpoint folder holds every file: its manifest lists all of them (it is written last), or it
    is of the older layout (trainer_state.pt was written last)."""
    try:
        entries = read_checksums(path)
    except ChecksumError:
        return True  # its manifest was written, so it was complete: listed, so that reading it names the damage
    if entries is not None:
        return all(name in entries for name in CHECKPOINT_FILES)
    return (path / LEGACY_STATE).is_file()


def checkpoint_dirs(out_dir: Path) -> list:
    """The complete checkpoints in ``out_dir``, oldest first (by step, not by name: past 10^7 steps the names
    grow a digit)."""
    found = [p for p in Path(out_dir).glob("ckpt_*")
             if checkpoint_step(p) is not None and p.is_dir() and _is_complete(p)]
    return sorted(found, key=checkpoint_step)


def _to_json(value, tensors: Dict[str, torch.Tensor], key: str):
    """``value`` as JSON, each tensor moved into ``tensors`` under ``key`` (its path in the state) and left as
    {"__tensor__": key}; tuples and dicts with keys other than text (the optimizer's parameter ids) are tagged
    so that _from_json gives back exactly what was saved."""
    if isinstance(value, torch.Tensor):
        while key in tensors:
            key += "'"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v, tensors, f"{key}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_to_json(v, tensors, f"{key}/{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _to_json(v, tensors, f"{key}/{k}") for k, v in value.items()}
        return {"__items__": [[_to_json(k, tensors, f"{key}/{k}"), _to_json(v, tensors, f"{key}/{k}")]
                              for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} (at {key}) in a checkpoint")


def _from_json(value, tensors: Optional[Dict[str, torch.Tensor]]):
    """The inverse of _to_json; with ``tensors`` None the tensors stay {"__tensor__": key}."""
    if isinstance(value, list):
        return [_from_json(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"__tensor__"}:
        if tensors is None:
            return value
        if value["__tensor__"] not in tensors:
            raise KeyError(f"tensor {value['__tensor__']!r} is not in trainer_state.safetensors")
        return tensors[value["__tensor__"]]
    if set(value) == {"__tuple__"}:
        return tuple(_from_json(v, tensors) for v in value["__tuple__"])
    if set(value) == {"__items__"}:
        return {_from_json(k, tensors): _from_json(v, tensors) for k, v in value["__items__"]}
    return {k: _from_json(v, tensors) for k, v in value.items()}


def _tensor_bytes(value) -> int:
    """Bytes of the tensors in a nested state: what writing it needs on disk, near enough."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def write_trainer_state(folder: Path, state: dict) -> None:
    """``state`` as trainer_state.safetensors (its tensors) and trainer_state.json (everything else)."""
    from safetensors.torch import save_file

    tensors: Dict[str, torch.Tensor] = {}
    body = {"format": _STATE_FORMAT, "version": 1, **{k: _to_json(v, tensors, k) for k, v in state.items()}}
    with atomic_path(folder / "trainer_state.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": _STATE_FORMAT})
    write_atomic(folder / "trainer_state.json", (json.dumps(body, indent=1) + "\n").encode("utf-8"))


def _read_legacy_state(path: Path) -> dict:
    import pickle

    try:
        # weights_only: torch's restricted unpickler, which refuses a pickle that would run code. The states we
        # pickled hold only tensors, numbers, text and containers, which it reads.
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise DataError(f"{path} was not loaded: it is damaged, or a pickle that would run code when loaded "
                        f"(refused: {' '.join(str(e).split())[:300]}). Resume only from checkpoints you wrote or "
                        f"trust; without it, train again without --resume") from None


def read_trainer_state(folder: Path, tensors: bool = True) -> dict:
    """The trainer state saved in checkpoint ``folder`` (without its tensors, e.g. for the settings alone, when
    ``tensors`` is False). Checks the files read against the manifest first. Whatever is wrong with the folder
    (damaged, incomplete, not ours) is a DataError that names the file."""
    folder = Path(folder)
    if not (folder / "trainer_state.json").is_file() and (folder / LEGACY_STATE).is_file():
        return _read_legacy_state(folder / LEGACY_STATE)
    names = ["trainer_state.json"] + (["trainer_state.safetensors"] if tensors else [])
    for name in names:
        if not (folder / name).is_file():
            raise DataError(f"{folder / name} is missing: {folder} is an incomplete checkpoint")
    verify_checksums(folder, names)
    source = folder / "trainer_state.json"
    try:
        body = json.loads(source.read_text(encoding="utf-8"))
        if not isinstance(body, dict) or body.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a {_STATE_FORMAT}")
        if body.get("version") != 1:
            raise ValueError(f"version {body.get('version')!r}, this gpt2fast reads version 1: upgrade gpt2fast")
        loaded = None
        if tensors:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                loaded = load_file(str(folder / "trainer_state.safetensors"))
            except SafetensorError as e:
                source = folder / "trainer_state.safetensors"
                raise ValueError(f"not a readable safetensors file ({e})") from None
        state = {k: _from_json(v, loaded) for k, v in body.items() if k not in ("format", "version")}
        for key, kind in (("step", int), ("optimizer", dict), ("loader", dict), ("rng", dict), ("config", dict),
                          ("model_config", dict)):
            if not isinstance(state.get(key), kind):
                raise ValueError(f"{key!r} is missing or not a {kind.__name__}")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{source} is damaged or not ours ({e})") from None
    return state


def read_checkpoint(folder: Path) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(trainer state, weights in Hugging Face's layout) of a checkpoint folder, every file checked against the
    manifest; weights or moments that are not finite are reported too (a checkpoint of the older layout has no
    checksums). Any of it is a DataError that names the file."""
    from gpt2fast.model import _load_hf_state

    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise DataError(f"{folder / name} is missing: {folder} is an incomplete checkpoint")
    verify_checksums(folder, ["config.json", "model.safetensors"])
    weights = _load_hf_state(folder)
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DataError(f"{folder / 'model.safetensors'}: {name} holds NaN or infinite values: the checkpoint "
                            f"is damaged")
    state = read_trainer_state(folder)
    if state["step"] != checkpoint_step(Path(folder.name.removeprefix(".tmp_"))):
        raise DataError(f"{folder / 'trainer_state.json'} is of step {state['step']}, not of the step the "
                        f"folder's name says: the files of two checkpoints were mixed up")

    def finite(value) -> bool:
        if isinstance(value, torch.Tensor):
            return not value.is_floating_point() or bool(torch.isfinite(value).all())
        if isinstance(value, dict):
            return all(finite(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return all(finite(v) for v in value)
        return True

    if not finite(state["optimizer"]):
        raise DataError(f"{folder}: the optimizer state holds NaN or infinite values: the checkpoint is damaged")
    return state, weights


def write_checkpoint(out_dir: Path, model, state: dict, vocab: Optional[Path] = None) -> Path:
    """Write checkpoint ``state["step"]`` of ``model`` and the trainer ``state`` into out_dir/.tmp_ckpt_N, then
    rename it to ckpt_N (an older folder of that name is first renamed away and removed only after). On any
    failure the temporary folder is removed and an older checkpoint is untouched; a full disk is a
    DiskFullError that says what was needed and what to do."""
    step = state["step"]
    final = out_dir / checkpoint_name(step)
    tmp = out_dir / f".tmp_{final.name}"
    _reached("ckpt.start", step)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)  # config.json, model.safetensors and their checksums.json, each fsynced
        _reached("ckpt.weights", step)
        write_trainer_state(tmp, state)
        _reached("ckpt.state", step)
        for name in VOCAB_FILES if vocab is not None else ():  # so generate --checkpoint decodes with it
            with atomic_path(tmp / name) as part:
                shutil.copyfile(vocab / name, part)
        entries = read_checksums(tmp) or {}
        entries.update({name: checksum_entry(tmp / name) for name in CHECKPOINT_FILES if name not in entries})
        entries.update({name: checksum_entry(tmp / name) for name in VOCAB_FILES if (tmp / name).exists()})
        write_checksums(tmp, entries)  # last: from here the folder is complete
        fsync_dir(tmp)
        _reached("ckpt.manifest", step)
    except BaseException as e:  # Ctrl-C and full disks too: no partial folder stays behind to fill the disk
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise _disk_full(out_dir, final, model, state) from None
        raise
    aside = None
    if final.exists():  # another run's checkpoint of this step, or a damaged one: replaced, never deleted first
        aside = out_dir / f".del_{final.name}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        _reached("ckpt.moved_aside", step)
    os.replace(tmp, final)
    fsync_dir(out_dir)
    _reached("ckpt.renamed", step)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final


def _disk_full(out_dir: Path, final: Path, model, state: dict) -> DiskFullError:
    needed = sum(p.numel() * p.element_size() for p in model.parameters()) + _tensor_bytes(state)
    free = shutil.disk_usage(out_dir).free
    kept = [p for p in checkpoint_dirs(out_dir) if checkpoint_step(p) < state["step"]]
    previous = f"the previous checkpoint {kept[-1]} is intact" if kept else "there is no earlier checkpoint"
    return DiskFullError(f"cannot write checkpoint {final}: the disk is full (the checkpoint needs about "
                         f"{human_bytes(needed)}; {human_bytes(free)} are free in {out_dir}). The partial copy was "
                         f"removed and {previous}. Free some space, or lower --keep-checkpoints, or give an "
                         f"--out-dir on a larger disk (moving the run there), then continue with --resume")


def _is_garbage(path: Path) -> bool:
    """A folder that a deletion of ours began (see _delete_folder)."""
    return path.is_dir() and path.name.startswith(".del_") and "ckpt_" in path.name


def _delete_folder(path: Path, step: int) -> None:
    """Remove a folder of ours, first renamed to .del_NAME so that a crash half-way through never leaves a
    half-deleted folder under a checkpoint's name (the next cleanup finishes the job)."""
    doomed = path if path.name.startswith(".del_") else path.with_name(f".del_{path.name.lstrip('.')}")
    if doomed != path:
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        _reached("cleanup.moved", step)
    for i, entry in enumerate(sorted(doomed.iterdir())):
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        if i == 0:
            _reached("cleanup.deleting", step)
    doomed.rmdir()


def remove_old_checkpoints(out_dir: Path, keep: int, step: int) -> None:
    """Keep the ``keep`` newest checkpoints up to ``step``; remove older ones, and what interrupted writes and
    deletions left: .del_* folders, temporary copies of steps up to ``step`` and incomplete checkpoint folders
    of ours before it. Nothing of a later step is touched: it may be the checkpoint of another run, or a damaged
    one that a resumed run replaces when it gets there."""
    out_dir = Path(out_dir)
    for old in [p for p in checkpoint_dirs(out_dir) if checkpoint_step(p) <= step][:-keep]:
        _delete_folder(old, step)
    for path in sorted(out_dir.iterdir()):
        if not path.is_dir():
            continue
        name_step = checkpoint_step(Path(path.name.removeprefix(".tmp_")))
        if _is_garbage(path):
            _delete_folder(path, step)
        elif path.name.startswith(".tmp_") and name_step is not None and name_step <= step:
            _delete_folder(path, step)
        elif checkpoint_step(path) is not None and checkpoint_step(path) < step and not _is_complete(path) \
                and all(_OUR_FILES.fullmatch(entry.name) for entry in path.iterdir()):
            _delete_folder(path, step)  # half-deleted by an older gpt2fast (weights without the state)


def save_checkpoint(out_dir: Path, model, optimizer, scaler, step: int, loader, cfg: TrainConfig, keep: int,
                    optimizer_state: Optional[dict] = None) -> Path:
    """Write the checkpoint of ``step`` (see write_checkpoint), then keep the last ``keep``."""
    path = write_checkpoint(Path(out_dir), model, trainer_state(model, optimizer, scaler, step, loader, cfg,
                                                                  optimizer_state))
    remove_old_checkpoints(Path(out_dir), keep, step)
    return path


def trainer_state(model, optimizer, scaler, step: int, loader, cfg: TrainConfig,
                  optimizer_state: Optional[dict] = None) -> dict:
    return {"step": step, "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler else None, "loader": loader.state_dict(), "rng": _rng_state(),
            "config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model.config)}


def recover_checkpoints(out_dir: Path, log=print) -> None:
    """Before --resume: finish what a crash interrupted. A complete temporary copy (its manifest written, every
    file matching it) is renamed into place: it was about to be; a partial one, and .del_* folders, are removed."""
    for tmp in sorted(Path(out_dir).glob(".tmp_ckpt_*")):
        final = tmp.with_name(tmp.name.removeprefix(".tmp_"))
        if not tmp.is_dir() or checkpoint_step(final) is None:
            continue
        try:
            good = _is_complete(tmp) and verify_checksums(tmp) is not None
        except ChecksumError:
            good = False
        if good:
            if final.exists():  # the copy it was replacing
                _delete_folder(final, checkpoint_step(final))
            os.replace(tmp, final)
            fsync_dir(out_dir)
            log(f"--resume: {final} completed from its temporary copy {tmp.name}, which a crash left whole")
        else:
            _delete_folder(tmp, checkpoint_step(final))
            log(f"--resume: removed {tmp}, a checkpoint that a crash left half-written")
    for doomed in sorted(Path(out_dir).glob(".del_*")):
        if _is_garbage(doomed):
            _delete_folder(doomed, -1)


def read_metrics(path: Path) -> List[Tuple[dict, str]]:
    """The records of a metrics.jsonl with their lines, in file order. A line that is not a record is dropped
    with a warning naming the file: the last one torn (the disk filled, or the process died, mid-write), or one
    damaged some other way."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return rows
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with a step")
        except ValueError:
            where = "its last line is torn (cut off mid-write: a full disk or a crash?)" if number == len(lines) \
                else f"line {number} is not a metrics record"
            warnings.warn(f"{path}: {where}; dropped: {line[:80]!r}", stacklevel=2)
            continue
        rows.append((record, line))
    return rows


# ---------------------------------------------------------------------------------------- training
class _HeldInterrupts:
    """Ctrl-C (SIGINT) that arrives while a step's update is applied and recorded (the weights, the step count,
    its validation and metrics line) is held until that is done, then raised: a KeyboardInterrupt half-way
    would leave the weights of one step beside the count of another, and the checkpoint saved on Ctrl-C would
    not resume exactly. Anywhere else it interrupts at once, as usual (Trainer.train_step puts back the batch
    it drew). Only the main thread can take signals; elsewhere nothing is held."""

    def __init__(self):
        self.holding = False  # between hold() and release(): in the middle of an update
        self.pending = False
        self._installed, self._previous = False, None

    def __enter__(self):
        self.holding = self.pending = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc_info):
        if self._installed:
            # None: a handler not set from Python, which cannot be put back; Python's own is the usual one
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False
        self.pending = False

    def _handle(self, signum, frame):
        if self.holding:
            self.pending = True
        elif callable(self._previous):
            self._previous(signum, frame)  # Python's own handler: KeyboardInterrupt
        elif self._previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    def hold(self):
        self.holding = True

    def release(self):
        """The update is recorded: raise a Ctrl-C that came meanwhile."""
        self.holding = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print):
        from gpt2fast import data
        from gpt2fast.model import GPT2, GPT2Config
        from gpt2fast.model import PRESETS as model_presets

        self.cfg = cfg
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.is_main = self.rank == 0
        self.log = log if self.is_main else (lambda s: None)
        self.out_dir = Path(cfg.out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ConfigError(f"--out-dir {self.out_dir} is a file, not a folder: give a folder for the checkpoints "
                              f"and metrics (it is created if missing)")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--out-dir {self.out_dir}: cannot create the folder ({e.strerror}); give a folder "
                              f"you can write to") from None
        self.device = _pick_device(cfg.device)
        if self.device.type == "cpu":
            threads = cfg.threads or min(torch.get_num_threads(), idle_cores())
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
                self.log(f"using {threads} CPU thread{'s' if threads > 1 else ''}"
                         + ("" if cfg.threads else " (the idle cores; --threads sets it)"))
        if self.world > 1:
            self._init_distributed()
        self.dtype = pick_dtype(cfg, self.device)
        torch.manual_seed(cfg.seed)

        if cfg.data:
            data_dir = Path(cfg.data)
        else:  # the packaged corpus, prepared once (gpt2fast/packaged_corpus.py)
            data_dir = packaged_corpus.folder_for(self.out_dir / "data", cfg.vocab)
            if self.is_main:
                packaged_corpus.prepare(self.out_dir / "data", cfg.vocab, log=self.log)
            self._barrier()
        manifest = data.read_manifest(data_dir)
        self.data_dir = data_dir
        self.tokenizer = packaged_corpus.tokenizer_for(data_dir)
        own_vocab = packaged_corpus.vocab_dir(data_dir)

        # On the CPU the Triton kernels cannot run: go straight to the reference ops instead of warning.
        backend = "torch" if self.device.type == "cpu" and cfg.backend == "auto" else cfg.backend
        if cfg.init_from:
            try:
                self.model = GPT2.from_pretrained(cfg.init_from, backend=backend)
            except (FileNotFoundError, ValueError) as e:  # from_pretrained's errors are all about the folder
                raise ConfigError(f"--init-from {cfg.init_from}: {e}") from None
        else:
            if cfg.model not in model_presets:
                raise ConfigError(f"--model {cfg.model!r} is not a model preset; choose one of "
                                  f"{', '.join(model_presets)}")
            config = GPT2Config.preset(cfg.model, block_size=cfg.block_size, dropout=cfg.dropout,
                                       gradient_checkpointing=cfg.gradient_checkpointing,
                                       **({"vocab_size": self.tokenizer.n_vocab} if own_vocab else {}))
            self.model = GPT2(config, backend=backend)
        mc = self.model.config
        if cfg.block_size > mc.block_size:
            raise ConfigError(f"--block-size={cfg.block_size} exceeds the model's context of {mc.block_size}")
        data_vocab = int(manifest["tokenizer"]["vocab_size"])
        if data_vocab > mc.vocab_size:
            raise ConfigError(f"the data in {data_dir} was tokenized with a vocabulary of {data_vocab} tokens, but "
                              f"the model predicts only {mc.vocab_size}: token ids beyond the model's vocabulary; "
                              f"give --data prepared with its tokenizer, or a model with a larger vocabulary")
        self.model.to(self.device)
        self.train_loader = data.TokenLoader(data_dir, "train", cfg.batch_size, cfg.block_size, seed=cfg.seed,
                                             rank=self.rank, world_size=self.world)
        # validation on the global batch, the same on every process, so it does not depend on the process count
        self.val_loader_args = (data_dir, "val", cfg.batch_size * self.world, cfg.block_size)
        data.TokenLoader(*self.val_loader_args, seed=cfg.seed)  # fails early if val is too short
        self.unigram = data.unigram_entropy(data_dir, "val")

        micro_tokens = cfg.batch_size * cfg.block_size * self.world
        target = cfg.tokens_per_step or micro_tokens
        if target % micro_tokens:
            raise ConfigError(f"--tokens-per-step={target} is not a multiple of batch_size x block_size x "
                              f"processes = {micro_tokens}")
        self.accum = target // micro_tokens
        self.tokens_per_step = target
        self.fsdp = cfg.fsdp and self.world > 1
        self.wrapped = self.model
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in self.model.transformer.h:
                fully_shard(block)
            fully_shard(self.model)
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.step = 0
        self.forward = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.history = []  # (step, train loss, val loss or None, lr)
        self._interrupts = _HeldInterrupts()
        self._saved_step = None  # the step whose checkpoint this run wrote (or resumed from): saved once
        if cfg.resume:
            self._resume()

    def _init_distributed(self):
        import torch.distributed as dist

        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def _barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _mean_over_processes(self, value: torch.Tensor) -> float:
        if self.world > 1:
            import torch.distributed as dist

            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world
        return float(value)

    def _resume(self):
        if self.is_main:
            recover_checkpoints(self.out_dir, self.log)
        self._barrier()
        found = checkpoint_dirs(self.out_dir)
        if not found:
            raise ConfigError(f"--resume: no checkpoint in {self.out_dir}; give the run's --out-dir, or train "
                              f"without --resume first")
        damaged = []
        for path in reversed(found):  # the newest that reads back whole
            try:
                state, weights = read_checkpoint(path)
                break
            except DataError as e:
                damaged.append(str(e))
                if self.is_main:
                    warnings.warn(f"--resume: {path} cannot be used: {e}", stacklevel=2)
        else:
            raise DataError(f"--resume: no checkpoint in {self.out_dir} can be used: {'; '.join(damaged)}. Put back "
                            f"a good copy of one, or train without --resume (which starts over)")
        if damaged and self.is_main:
            warnings.warn(f"--resume: continuing from {path}, the newest good checkpoint, instead: a newer one is "
                          f"damaged (see above) and is replaced when training reaches its step", stacklevel=2)
        if state["model_config"] != dataclasses.asdict(self.model.config):
            raise ConfigError(f"--resume: {path} holds a model of another shape ({state['model_config']}) than "
                              f"this run's ({dataclasses.asdict(self.model.config)})")
        from gpt2fast.model import GPT2

        loaded = GPT2(self.model.config, backend="torch")
        loaded.load_hf_state_dict(weights, source=str(path))
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=loaded.state_dict(),
                           optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(loaded.state_dict())
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        try:
            self.train_loader.load_state_dict(state["loader"])
        except InputError as e:  # a state saved over other data or settings: say which checkpoint it came from
            raise type(e)(f"--resume: {path}: {e}") from None
        _set_rng_state(state["rng"])
        self.step = self._saved_step = state["step"]
        self._resume_metrics()
        self.log(f"resumed from {path} at step {self.step}")

    def _resume_metrics(self):
        """Take the history up to the checkpoint's step from metrics.jsonl, and cut the file back to it: the steps
        after it are trained again, and logged again. Where a step was logged twice (by a gpt2fast that did not
        cut the file) the later line wins: it is the one the run went on from."""
        path = self.out_dir / "metrics.jsonl"
        if not self.is_main or not path.exists():
            return
        kept = {}
        for record, line in read_metrics(path):
            if record["step"] <= self.step:
                kept[record["step"]] = (record, line)
        kept = [kept[step] for step in sorted(kept)]
        for record, _ in kept:
            self.history.append((record["step"], record.get("loss"), record.get("val_loss"), record.get("lr")))
        text = "".join(line + "\n" for _, line in kept)
        if path.read_text(encoding="utf-8", errors="replace") != text:
            try:
                write_atomic(path, text.encode("utf-8"))
            except OSError as e:
                if is_disk_full(e):
                    raise DiskFullError(f"--resume: cannot rewrite {path}: the disk is full; free some space, "
                                        f"then --resume again") from None
                raise

    def autocast(self):
        if self.dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def evaluate(self) -> float:
        from gpt2fast import data

        self.model.eval()
        loader = data.TokenLoader(*self.val_loader_args, seed=self.cfg.seed)  # the same batches every time
        losses = []
        for _ in range(self.cfg.eval_batches):  # every process the same batches: no communication
            x, y = (t.to(self.device) for t in loader.next_batch())
            with self.autocast():
                losses.append(self.model(x, y)[1].float().item())
        self.model.train()
        return sum(losses) / len(losses)

    def train_step(self) -> float:
        cfg = self.cfg
        lr = learning_rate(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        position, rng = self.train_loader.state_dict(), self._dropout_rng()
        try:
            for micro in range(self.accum):
                x, y = (t.to(self.device, non_blocking=True) for t in self.train_loader.next_batch())
                # gradients are averaged across processes only on the last micro-batch of the step
                sync = micro == self.accum - 1 or self.world == 1
                if self.fsdp:
                    self.model.set_requires_gradient_sync(sync)
                with contextlib.nullcontext() if sync or self.fsdp else self.wrapped.no_sync():
                    with self.autocast():
                        _, loss = self.forward(x, y)
                    loss = loss / self.accum
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                total += loss.detach().float()
                _reached("step.backward", self.step + 1)
            self._interrupts.hold()  # from here to the metrics line Ctrl-C waits (run releases it)
        except KeyboardInterrupt:
            # nothing of this step was applied: put back the batches it drew (and the dropout RNG), so that a
            # checkpoint saved now resumes with them
            self.train_loader.load_state_dict(position)
            self._dropout_rng(rng)
            self.optimizer.zero_grad(set_to_none=True)
            raise
        total = self._mean_over_processes(total)
        if not math.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.update()
            return total
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _reached("step.update", self.step + 1)
        return total

    def _dropout_rng(self, state=None):
        """The state of the generator that dropout draws from (this device's), or with ``state`` set it back.
        Only this one: the other GPUs' would each cost this process a CUDA context."""
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device) if state is None else torch.cuda.set_rng_state(state,
                                                                                                       self.device)
        return torch.get_rng_state() if state is None else torch.set_rng_state(state)

    def sample(self, prompt: str = "", tokens: Optional[int] = None) -> str:
        tok = self.tokenizer
        ids = tok.encode(prompt) if prompt else [tok.eot_token]
        idx = torch.tensor([ids], device=self.device)
        out = self.model.generate(idx, tokens or self.cfg.sample_tokens, temperature=0.8, top_k=100, seed=self.cfg.seed,
                                  eot_token=tok.eot_token)
        return tok.decode([i for i in out[0, len(ids):].tolist() if i != tok.eot_token])

    def save(self) -> Optional[Path]:
        """Write this step's checkpoint, once: a second call at the same step (the last step when max_steps is a
        multiple of checkpoint_interval, a Ctrl-C just after a checkpoint) keeps the one written. On the main
        process; under FSDP every process must call it (the shards are gathered first)."""
        cfg, final = self.cfg, self.out_dir / checkpoint_name(self.step)
        if self._saved_step == self.step:  # every process knows it alike: under FSDP all skip the gather
            if not self.is_main:
                return None
            remove_old_checkpoints(self.out_dir, cfg.keep_checkpoints, self.step)  # a Ctrl-C may have cut it short
            return final
        model, optimizer_state = self.model, None
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            from gpt2fast.model import GPT2

            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=full)
            if self.is_main:
                model = GPT2(self.model.config, backend="torch")
                model.load_state_dict(model_state)
        if not self.is_main:
            self._saved_step = self.step
            return None
        state = trainer_state(model, self.optimizer, self.scaler, self.step, self.train_loader, cfg, optimizer_state)
        path = write_checkpoint(self.out_dir, model, state, vocab=packaged_corpus.vocab_dir(self.data_dir))
        self._saved_step = self.step
        remove_old_checkpoints(self.out_dir, cfg.keep_checkpoints, self.step)
        _reached("cleanup.done", self.step)
        return path

    def _tensorboard_writer(self):
        """A SummaryWriter under out_dir/tensorboard when --tensorboard is on (main process), else None."""
        if not (self.cfg.tensorboard and self.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(f"--tensorboard=true needs the tensorboard package ({e}): pip install tensorboard, "
                              f"or leave it off (metrics.jsonl has the same figures)") from None
        return SummaryWriter(log_dir=str(self.out_dir / "tensorboard"), purge_step=self.step + 1)

    def run(self) -> dict:
        cfg = self.cfg
        peak = peak_flops(self.device)
        fpt = model_flops_per_token(self.model.config, seq=cfg.block_size)
        tensorboard = self._tensorboard_writer()  # before anything is written: a missing package stops here
        metrics_path = self.out_dir / "metrics.jsonl"
        metrics_file = open(metrics_path, "a" if cfg.resume else "w", encoding="utf-8") \
            if self.is_main else open(os.devnull, "w")
        self.log(f"training {cfg.model} ({self.model.num_params() / 1e6:.1f}M parameters) on {self.device} in "
                 f"{str(self.dtype).replace('torch.', '')}, {self.tokens_per_step} tokens/step "
                 f"({self.accum} micro-batch{'es' if self.accum > 1 else ''}); unigram entropy of the validation "
                 f"text: {self.unigram:.3f} nats/token")
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=None if self.is_main else True)
        started, bad, val_loss, first_step = time.perf_counter(), 0, None, self.step
        try:
            with self._interrupts:
                while self.step < cfg.max_steps:
                    _reached("step.start", self.step + 1)
                    t0 = time.perf_counter()
                    loss = self.train_step()  # from its update on, a Ctrl-C is held until release() below
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                    if not math.isfinite(loss):
                        bad += 1
                        warnings.warn(f"step {self.step}: the loss is {loss}; the step was skipped ({bad} in a row)",
                                      stacklevel=2)
                        if bad >= cfg.max_bad_steps:
                            raise RuntimeError(f"{bad} non-finite losses in a row at step {self.step}: lower --lr, "
                                               f"raise --warmup-steps or check the data")
                        self._interrupts.release()
                        continue
                    bad = 0
                    lr = learning_rate(self.step, cfg)
                    self.step += 1
                    tok_s = self.tokens_per_step / dt
                    mfu = tok_s * fpt / peak if peak else None
                    record = {"step": self.step, "loss": loss, "lr": lr, "tokens_per_s": tok_s,
                              "mfu": mfu, "time": time.time()}
                    val_loss = None
                    if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                        val_loss = self.evaluate()
                        record.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
                    try:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                    except OSError as e:
                        if is_disk_full(e):
                            raise DiskFullError(f"cannot write {metrics_path}: the disk is full; free some space "
                                                f"(or give an --out-dir on a larger disk), then continue with "
                                                f"--resume from the last checkpoint") from None
                        raise
                    self.history.append((self.step, loss, val_loss, lr))
                    self._interrupts.release()  # the step is recorded: a held Ctrl-C stops here
                    if tensorboard is not None:
                        for key, value in record.items():
                            if key not in ("step", "time") and value is not None:
                                tensorboard.add_scalar(f"train/{key}", value, self.step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:,.0f}",
                                    mfu="-" if mfu is None else f"{mfu:.1%}")
                    if val_loss is not None and self.is_main:
                        bar.write(f"step {self.step}: val loss {val_loss:.3f} (unigram entropy {self.unigram:.3f})")
                    if cfg.sample_interval and self.step % cfg.sample_interval == 0 and self.is_main \
                            and not self.fsdp:
                        bar.write(f"sample: {self.sample()!r}")
                    if self.step % cfg.checkpoint_interval == 0:
                        self.save()
                    out_of_time = cfg.max_minutes and time.perf_counter() - started > cfg.max_minutes * 60
                    if self.world > 1:  # every process must stop at the same step
                        out_of_time = self._mean_over_processes(torch.tensor(float(bool(out_of_time)))) > 0
                    if out_of_time:
                        self.log(f"stopping after {cfg.max_minutes} minutes (--max-minutes)")
                        break
            bar.close()
            if val_loss is None:
                val_loss = self.evaluate()
                self.history.append((self.step, self.history[-1][1] if self.history else float("nan"), val_loss,
                                     learning_rate(self.step, cfg)))
            path = self.save()
        except KeyboardInterrupt:
            bar.close()
            if self._interrupts.holding:  # raised inside an update (not by a signal, which would have waited)
                self.log(f"interrupted while applying step {self.step + 1}: nothing saved; --resume continues "
                         f"from the last checkpoint")
                raise
            path = self.save()
            self.log(f"interrupted: saved {path}; continue with --resume")
            raise
        except torch.cuda.OutOfMemoryError:
            raise RuntimeError(f"out of GPU memory at micro-batch {cfg.batch_size} x {cfg.block_size}: lower "
                               f"--batch-size (keeping --tokens-per-step, which accumulates more micro-batches) or "
                               f"turn on --gradient-checkpointing=true") from None
        finally:
            metrics_file.close()
            if tensorboard is not None:
                tensorboard.close()
        plot = self.plot() if self.is_main else None
        seconds = time.perf_counter() - started
        summary = {"steps": self.step, "seconds": round(seconds, 1),
                   "tokens_per_s": round(self.tokens_per_step * (self.step - first_step) / max(seconds, 1e-9)),
                   **self.bits_per_byte(), "checkpoint": str(path), "plot": str(plot)}
        if self.is_main:
            write_atomic(self.out_dir / "summary.json", (json.dumps(summary, indent=1) + "\n").encode("utf-8"))
        return {"step": self.step, "val_loss": val_loss, "unigram_entropy": self.unigram, "checkpoint": str(path),
                "plot": str(plot), "summary": summary}

    def bits_per_byte(self) -> dict:
        """The model's loss over the whole validation split (windows of block_size, no overlap) beside the
        unigram baseline, per token and per byte of text: bits per byte compare across tokenizations."""
        from gpt2fast import data

        tokens = torch.from_numpy(np.concatenate([np.asarray(c) for c in
                                                  data.ShardDataset(self.data_dir, "val").chunks()]).astype(np.int64))
        T, total, count = self.cfg.block_size, 0.0, 0
        self.model.eval()
        with torch.no_grad():
            for start in range(0, tokens.numel() - 1, T * self.cfg.batch_size):
                span = tokens[start:start + T * self.cfg.batch_size + 1]
                rows = (span.numel() - 1) // T
                if rows == 0:
                    x, y = span[None, :-1], span[None, 1:]
                else:
                    x, y = span[:rows * T].view(rows, T), span[1:rows * T + 1].view(rows, T)
                with self.autocast():
                    loss = self.model(x.to(self.device), y.to(self.device))[1].float().item()
                total, count = total + loss * y.numel(), count + y.numel()
        self.model.train()
        n_tokens, n_bytes = packaged_corpus.split_bytes(self.data_dir, "val", self.tokenizer)
        val_loss = total / max(1, count)
        return {"val_loss": round(val_loss, 4), "unigram_entropy": round(self.unigram, 4),
                "val_bits_per_byte": round(packaged_corpus.bits_per_byte(val_loss, n_tokens, n_bytes), 4),
                "unigram_bits_per_byte": round(packaged_corpus.bits_per_byte(self.unigram, n_tokens, n_bytes), 4),
                "vocab_size": self.tokenizer.n_vocab}

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h[0] for h in self.history]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ax1.plot(steps, [h[1] for h in self.history], label="train", lw=1)
        val = [(h[0], h[2]) for h in self.history if h[2] is not None]
        if val:
            ax1.plot(*zip(*val), "o-", label="validation")
        ax1.axhline(self.unigram, color="gray", ls="--", label="unigram entropy")
        ax1.set_xlabel("step")
        ax1.set_ylabel("loss (nats/token)")
        ax1.legend()
        ax1.set_title("loss")
        ax2.plot(steps, [h[3] for h in self.history])
        ax2.set_xlabel("step")
        ax2.set_title("learning rate")
        fig.tight_layout()
        path = self.out_dir / "loss.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")  # the temporary name's suffix says nothing of the format
        plt.close(fig)
        return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return 0
    try:
        cfg = parse_args(argv)
        trainer = Trainer(cfg)
        result = trainer.run()
    except KeyboardInterrupt:
        return 130
    except (InputError, BackendUnavailable) as e:
        # a bad setting or data file, or --backend naming a path that cannot run here: one line that names it
        # and the fix. Anything else (a CUDA or torch failure, a bug of ours) keeps its traceback.
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if not trainer.is_main:
        return 0
    print(f"checkpoint: {result['checkpoint']}\nloss curve: {result['plot']}")
    if trainer.fsdp:
        print(f"sample: python -m gpt2fast.generate --checkpoint {result['checkpoint']}")
    else:
        print(f"sample: {trainer.sample()!r}")
    s = result["summary"]
    ratio = s["val_bits_per_byte"] / s["unigram_bits_per_byte"]
    print(f"done: {s['steps']} steps in {s['seconds']:.0f} s ({s['tokens_per_s']:,} tokens/s); validation "
          f"{s['val_loss']:.3f} nats/token = {s['val_bits_per_byte']:.3f} bits/byte, {ratio:.2f}x the unigram "
          f"baseline's {s['unigram_bits_per_byte']:.3f} bits/byte ({s['unigram_entropy']:.3f} nats/token, "
          f"{s['vocab_size']:,}-token vocabulary); summary: {cfg.out_dir}/summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
