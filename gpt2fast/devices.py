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


def idle_cores(sample_s: float = 0.25) -> int:
    """How many of this machine's cores are idle now, from two reads of /proc/stat (Linux): on a CPU, a thread
    per core that another program keeps busy makes every step wait for the slowest thread, so the trainer uses
    the idle ones. Where /proc/stat cannot be read, every core counts."""
    import os
    import time

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def times():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = times()
        time.sleep(sample_s)
        total1, idle1 = times()
    except (OSError, ValueError, IndexError):
        return cores
    if total1 <= total0:
        return cores
    machine = os.cpu_count() or cores
    busy = machine * (1 - (idle1 - idle0) / (total1 - total0))
    return max(1, min(cores, round(machine - busy)))
