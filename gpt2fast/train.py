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
import shutil
import sys
import time
import typing
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional

import torch

from gpt2fast._io import atomic_path, fsync_dir
from gpt2fast.compute import model_flops_per_token
from gpt2fast.devices import pick_device
from gpt2fast.errors import ConfigError, InputError
from gpt2fast.hardware import detect_gpu
from gpt2fast.ops._dispatch import BackendUnavailable


# ------------------------------------------------------------------------------------------ config
def _setting(default, help: str):
    """A TrainConfig field with the line --help shows for it: the command line is built from these fields."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # data
    data: str = _setting("", "prepared shards (python -m gpt2fast.data prepare); empty: prepare the packaged corpus")
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
    batch_size: int = _setting(8, "sequences per micro-batch (per process)")
    tokens_per_step: int = _setting(0, "tokens per optimizer step, all processes; 0: one micro-batch "
                                       "(GPT-2: 524288)")
    max_steps: int = _setting(300, "optimizer steps to train for")
    max_minutes: float = _setting(4.5, "stop (with a checkpoint) after this much training time; 0: no limit")
    lr: float = _setting(1.5e-3, "peak learning rate")
    min_lr: float = _setting(1.5e-4, "reached at max_steps by the cosine decay")
    warmup_steps: int = _setting(30, "steps of linear warmup to lr")
    weight_decay: float = _setting(0.1, "AdamW weight decay, on matrices only")
    beta1: float = _setting(0.9, "AdamW beta1")
    beta2: float = _setting(0.95, "AdamW beta2")
    optimizer: str = _setting("torch", "torch: torch.optim.AdamW (fused on CUDA); gpt2fast: ours, one CUDA launch "
                                       "per group")
    grad_clip: float = _setting(1.0, "max global gradient norm; 0: no clipping")
    dtype: str = _setting("auto", "auto: bf16 on GPUs that have it, fp16 (loss scaling) on older GPUs, fp32 on "
                                  "the CPU; or float32, bfloat16, float16")
    device: str = _setting("auto", "auto, cpu, cuda, cuda:1...")
    seed: int = _setting(1337, "seeds the initial weights, the batch order and the samples")
    # evaluation, logging, checkpoints
    tensorboard: bool = _setting(False, "also write the metrics for TensorBoard to out_dir/tensorboard "
                                        "(pip install tensorboard)")
    eval_interval: int = _setting(50, "steps between validation runs")
    eval_batches: int = _setting(8, "micro-batches per validation run")
    sample_interval: int = _setting(0, "steps between samples printed while training; 0: only at the end")
    sample_tokens: int = _setting(60, "tokens per sample")
    checkpoint_interval: int = _setting(200, "steps between checkpoints (one is also written at the end)")
    keep_checkpoints: int = _setting(2, "the last K checkpoints are kept")
    resume: bool = _setting(False, "continue from the latest checkpoint in out_dir")
    max_bad_steps: int = _setting(5, "consecutive non-finite losses before giving up")
    # several processes (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK): DDP, or with fsdp=true FSDP
    fsdp: bool = _setting(False, "with several processes: FSDP, which shards parameters, gradients and optimizer "
                                 "state across them (for models that don't fit one GPU), instead of DDP")

    def __post_init__(self):
        positive = ("block_size", "batch_size", "max_steps", "eval_interval", "eval_batches", "checkpoint_interval",
                    "keep_checkpoints", "max_bad_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("tokens_per_step", "warmup_steps", "sample_interval", "sample_tokens", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if not 0 <= self.dropout < 1:  # checked here, so that the model's own check never has to name a setting
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.backend not in ("auto", "cuda", "triton", "torch"):
            raise ConfigError(f"--backend must be auto, cuda, triton or torch, got {self.backend!r}")
        if self.optimizer not in ("torch", "gpt2fast"):
            raise ConfigError(f"--optimizer must be torch (torch.optim.AdamW, fused on CUDA) or gpt2fast "
                              f"(gpt2fast.ops.adamw.AdamW: one CUDA launch per group), got {self.optimizer!r}")


PRESETS = {
    "default": {},
    # GPT-2's own recipe, nanoGPT-style: 0.5M tokens per step
    **{name: dict(model=name, block_size=1024, batch_size=batch, tokens_per_step=524_288, lr=lr, min_lr=lr / 10,
                  warmup_steps=700, max_steps=19_073, max_minutes=0, eval_interval=250, eval_batches=20,
                  checkpoint_interval=1000, sample_interval=1000)
       for name, batch, lr in (("gpt2", 32, 6e-4), ("gpt2-medium", 16, 3e-4), ("gpt2-large", 8, 2.5e-4),
                               ("gpt2-xl", 4, 2e-4))},
    "gpt2-mini": dict(model="gpt2-mini", block_size=256, batch_size=16, lr=1e-3, min_lr=1e-4, max_minutes=0),
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
def checkpoint_dirs(out_dir: Path) -> list:
    return sorted(p for p in out_dir.glob("ckpt_*") if p.is_dir() and (p / "trainer_state.pt").is_file())


def save_checkpoint(out_dir: Path, model, optimizer, scaler, step: int, loader, cfg: TrainConfig, keep: int,
                    optimizer_state: Optional[dict] = None) -> Path:
    """Weights as safetensors (loadable by GPT2.from_pretrained) plus the trainer's state, written into a
    temporary folder and renamed, so a crash never leaves a half-written checkpoint; the last ``keep`` stay."""
    final = out_dir / f"ckpt_{step:07d}"
    tmp = out_dir / f".tmp_ckpt_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # its files go through gpt2fast._io, like trainer_state.pt below
    state = {"step": step, "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
             "scaler": scaler.state_dict() if scaler else None, "loader": loader.state_dict(), "rng": _rng_state(),
             "config": dataclasses.asdict(cfg),
             "model_config": dataclasses.asdict(model.config)}
    # every file reaches the disk before the folder is renamed into place: a crash just after the rename must not
    # leave a checkpoint whose state file is still empty in the page cache
    with atomic_path(tmp / "trainer_state.pt") as state_path:
        torch.save(state, state_path)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(out_dir)
    for old in checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------- training
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
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = _pick_device(cfg.device)
        if self.world > 1:
            self._init_distributed()
        self.dtype = pick_dtype(cfg, self.device)
        torch.manual_seed(cfg.seed)

        data_dir = Path(cfg.data) if cfg.data else self.out_dir / "data"
        if not cfg.data:  # the packaged corpus, prepared once; rebuilt if the package changed under it
            options = data.PrepareOptions(val_fraction=0.05)
            if self.is_main:
                try:
                    data.prepare([], data_dir, options, log=lambda s: None)
                except data.DataError:
                    data.prepare([], data_dir, options, force=True, log=lambda s: None)
            self._barrier()
        manifest = data.read_manifest(data_dir)
        self.data_dir = data_dir

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
                                       gradient_checkpointing=cfg.gradient_checkpointing)
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
        from gpt2fast.model import GPT2

        found = checkpoint_dirs(self.out_dir)
        if not found:
            raise ConfigError(f"--resume: no checkpoint in {self.out_dir}; give the run's --out-dir, or train "
                              f"without --resume first")
        path = found[-1]
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        if state["model_config"] != dataclasses.asdict(self.model.config):
            raise ConfigError(f"--resume: {path} holds a model of another shape ({state['model_config']}) than "
                              f"this run's ({dataclasses.asdict(self.model.config)})")
        loaded = GPT2.from_pretrained(path, backend="torch")
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
        self.step = state["step"]
        history = self.out_dir / "metrics.jsonl"
        if history.exists():
            for line in history.read_text().splitlines():
                m = json.loads(line)
                if m["step"] < self.step:
                    self.history.append((m["step"], m["loss"], m.get("val_loss"), m["lr"]))
        self.log(f"resumed from {path} at step {self.step}")

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
        return total

    def sample(self, prompt: str = "", tokens: Optional[int] = None) -> str:
        from gpt2fast.tokenizer import Tokenizer

        tok = Tokenizer.gpt2()
        ids = tok.encode(prompt) if prompt else [tok.eot_token]
        idx = torch.tensor([ids], device=self.device)
        out = self.model.generate(idx, tokens or self.cfg.sample_tokens, temperature=0.8, top_k=100, seed=self.cfg.seed,
                                  eot_token=tok.eot_token)
        return tok.decode([i for i in out[0, len(ids):].tolist() if i != tok.eot_token])

    def save(self) -> Optional[Path]:
        """On the main process; under FSDP every process must call it (the shards are gathered first)."""
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
            return None
        return save_checkpoint(self.out_dir, model, self.optimizer, self.scaler, self.step, self.train_loader,
                               self.cfg, self.cfg.keep_checkpoints, optimizer_state=optimizer_state)

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
        metrics_file = open(self.out_dir / "metrics.jsonl", "a" if cfg.resume else "w", encoding="utf-8") \
            if self.is_main else open(os.devnull, "w")
        self.log(f"training {cfg.model} ({self.model.num_params() / 1e6:.1f}M parameters) on {self.device} in "
                 f"{str(self.dtype).replace('torch.', '')}, {self.tokens_per_step} tokens/step "
                 f"({self.accum} micro-batch{'es' if self.accum > 1 else ''}); unigram entropy of the validation "
                 f"text: {self.unigram:.3f} nats/token")
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=None if self.is_main else True)
        started, bad, val_loss = time.perf_counter(), 0, None
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                loss = self.train_step()
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
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if tensorboard is not None:
                    for key, value in record.items():
                        if key not in ("step", "time") and value is not None:
                            tensorboard.add_scalar(f"train/{key}", value, self.step)
                self.history.append((self.step, loss, val_loss, lr))
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:,.0f}",
                                mfu="-" if mfu is None else f"{mfu:.1%}")
                if val_loss is not None and self.is_main:
                    bar.write(f"step {self.step}: val loss {val_loss:.3f} (unigram entropy {self.unigram:.3f})")
                if cfg.sample_interval and self.step % cfg.sample_interval == 0 and self.is_main and not self.fsdp:
                    bar.write(f"sample: {self.sample()!r}")
                if self.step % cfg.checkpoint_interval == 0:
                    self.save()
                out_of_time = cfg.max_minutes and time.perf_counter() - started > cfg.max_minutes * 60
                if self.world > 1:  # every process must stop at the same step
                    out_of_time = self._mean_over_processes(torch.tensor(float(bool(out_of_time)))) > 0
                if out_of_time:
                    self.log(f"stopping after {cfg.max_minutes} minutes (--max-minutes)")
                    break
        except KeyboardInterrupt:
            bar.close()
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
        bar.close()
        if val_loss is None:
            val_loss = self.evaluate()
            self.history.append((self.step, self.history[-1][1] if self.history else float("nan"), val_loss,
                                 learning_rate(self.step, cfg)))
        path = self.save()
        plot = self.plot() if self.is_main else None
        return {"step": self.step, "val_loss": val_loss, "unigram_entropy": self.unigram, "checkpoint": str(path),
                "plot": str(plot)}

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
    verdict = "below" if result["val_loss"] < result["unigram_entropy"] else "NOT below"
    print(f"validation loss {result['val_loss']:.3f} nats/token after {result['step']} steps: {verdict} the unigram "
          f"entropy {result['unigram_entropy']:.3f}")
    print(f"checkpoint: {result['checkpoint']}\nloss curve: {result['plot']}")
    if trainer.fsdp:
        print(f"sample: python -m gpt2fast.generate --checkpoint {result['checkpoint']}")
    else:
        print(f"sample: {trainer.sample()!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
