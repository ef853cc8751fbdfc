"""Which device a command runs on: the one parser of --device for every CLI of ours."""
from __future__ import annotations

import torch

from gpt2fast.errors import ConfigError


def pick_device(name: str, flag: str = "--device") -> torch.device:
    """"auto" (the GPU if there is one), "cpu", "cuda" or "cuda:N"; a device this machine lacks is a
    ConfigError that says what is there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{flag} {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                              f"use {flag} cpu, or auto to take a GPU when there is one")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                              f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise ConfigError(f"{flag} {name}: only cpu and cuda devices are supported")
    return device
