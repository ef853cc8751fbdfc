"""What every benchmark suite records for the end-of-session summary and the results JSON.

    record("encode_ordinary, 1 thread", "ours", Figure("gpt2fast", 75.1, "MB/s"), goal=3.0)
    record(group, "peer", Figure("tiktoken", 17.4, "MB/s"))

A group (a pytest-benchmark group: one workload) holds our figures and the peers' figures, by
implementation name. The summary has one row per pair of them, ours x peer: the tokenizer groups have one of
each, so one row; a GPU group with ours (triton), ours (cuda), eager PyTorch and torch.compile has four. A
goal is the ratio ours / peer must reach, for every peer of the group or, with ``goal_peer``, for one.
``conftest.pytest_terminal_summary`` prints the rows and writes them with ``write_json`` (format and report:
``gpt2fast.bench``).
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from gpt2fast.bench import DEFAULT_RESULTS, Figure, Results, Row, write_results

REPO_ROOT = Path(__file__).resolve().parents[1]
JSON_ENV = "GPT2FAST_BENCH_JSON"
DEFAULT_JSON = REPO_ROOT / DEFAULT_RESULTS  # .benchmarks/ is git-ignored

__all__ = ["Figure", "Row", "record", "rows", "NOTES", "SESSION", "machine_info", "write_json"]


@dataclass
class Group:
    suite: str
    ours: Dict[str, Figure] = field(default_factory=dict)  # by impl, in the order recorded
    peers: Dict[str, Figure] = field(default_factory=dict)
    goals: Dict[Optional[str], float] = field(default_factory=dict)  # peer impl (None: any peer) -> goal


GROUPS: Dict[str, Group] = {}
NOTES: List[str] = []  # free-form lines for the summary (linear-time ratios, memory detail, goals in absolutes)
# Descriptions for the summary header and the JSON's machine info, filled in by the suites as they run.
SESSION: Dict[str, Any] = {"corpus": None, "timing": None, "gpu_timing": None, "gpu": None, "gpu_peak": None,
                           "measured_ceilings": {}}


def record(group: str, role: str, figure: Figure, goal: Optional[float] = None, *, suite: str = "tokenizer",
           goal_peer: Optional[str] = None) -> None:
    """Add ``figure`` (``role`` "ours" or "peer") to ``group``; ``goal`` (ours / peer) applies to the peer
    named ``goal_peer``, or to every peer of the group when that is None. Recording an impl again replaces
    its figure."""
    if role not in ("ours", "peer"):
        raise ValueError(f"role must be 'ours' or 'peer', got {role!r}")
    entry = GROUPS.setdefault(group, Group(suite))
    (entry.ours if role == "ours" else entry.peers)[figure.impl] = figure
    if goal is not None:
        entry.goals[goal_peer] = goal


def rows() -> List[Row]:
    """Every ours x peer pair of every group, groups in the order first recorded; a side with no figure
    gives rows with that side empty (a size only ours runs, a peer whose ours was skipped)."""
    out = []
    for name, group in GROUPS.items():
        for ours in list(group.ours.values()) or [None]:
            for peer in list(group.peers.values()) or [None]:
                goal = group.goals.get(peer.impl if peer else None, group.goals.get(None))
                out.append(Row(name, ours, peer, goal, group.suite))
    return out


def reset() -> None:
    GROUPS.clear()
    NOTES.clear()


def _git_commit() -> Optional[str]:
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _versions() -> Dict[str, Optional[str]]:
    found = {"python": platform.python_version(), "torch": None, "triton": None}
    for name in ("torch", "triton"):
        try:
            found[name] = __import__(name).__version__
        except Exception:  # not installed, or a broken install: leave it out of the header
            pass
    return found


def machine_info(quick: bool) -> Dict[str, Any]:
    """Where and how the figures were measured, for the JSON and the report's header."""
    info: Dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "commit": _git_commit(), "mode": "quick" if quick else "full",
                            "timing": SESSION.get("timing"), "gpu_timing": SESSION.get("gpu_timing"),
                            "cpu_count": os.cpu_count(), "cpu": _cpu_model(),
                            "platform": platform.platform(), **_versions(),
                            "gpu": SESSION.get("gpu"), "gpu_peak": SESSION.get("gpu_peak"),
                            "measured_ceilings": dict(SESSION.get("measured_ceilings") or {}),
                            "corpus": SESSION.get("corpus")}
    torch = sys.modules.get("torch")  # imported by _versions where installed
    if torch is not None and torch.cuda.is_available():
        if info["gpu"] is None:
            info["gpu"] = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        info["gpu_arch"] = f"sm_{major}{minor}"
    return info


def json_path(option: Optional[str]) -> Path:
    """``--gpt2fast-json=PATH``, else ``$GPT2FAST_BENCH_JSON``, else ``.benchmarks/gpt2fast-results.json``."""
    chosen = option or os.environ.get(JSON_ENV) or DEFAULT_JSON
    return Path(chosen).expanduser()


def write_json(path: Path, quick: bool) -> Path:
    return write_results(path, Results(rows(), machine_info(quick), list(NOTES)))
