"""Benchmark results: the rows the benchmark suites record, their JSON file, and its report.

    pytest benchmarks/ --benchmark-only                       # writes .benchmarks/gpt2fast-results.json
    python -m gpt2fast.bench report .benchmarks/gpt2fast-results.json
        [--markdown FILE] [--png FILE] [--out PREFIX] [--no-png]

``report`` prints the results as a Markdown table (or writes it to ``--markdown FILE`` / ``PREFIX.md``) and
draws a bar chart PNG, by default next to the JSON (``gpt2fast-results.png``): one bar per benchmark with
ours / peer (a line at 1, the goal marked) and, for GPU benchmarks, the share of the GPU's peak and of the
ceiling measured on the spot.

A row is one comparison: a benchmark, our figure, the peer's figure measured in the same run, the ratio
(> 1: ours is better, whichever way the unit points), the goal for that ratio and whether it was met; GPU
figures also carry their share of peak (see ``gpt2fast.hardware.peak_shares``). The JSON is
``{"format": "gpt2fast-bench-results", "version": 1, "machine": {...}, "rows": [...], "notes": [...]}``.
Nothing here imports torch; matplotlib is imported only to draw the chart.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from gpt2fast._io import write_atomic

FORMAT = "gpt2fast-bench-results"
VERSION = 1
DEFAULT_RESULTS = Path(".benchmarks") / "gpt2fast-results.json"  # under the repository root
OURS_IMPL = "gpt2fast"  # the impl name left out when a figure is shown (the tokenizer's "ours")
SHARE_COLUMNS = {"detected": "of GPU peak", "measured": "of measured ceiling",
                 "V100": "of V100", "A100": "of A100", "H100": "of H100"}


class BenchReportError(ValueError):
    """A results file that cannot be read or is not ours; the message names the file and what to do."""


# ------------------------------------------------------------------------------------------- rows
def _number(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.3f}"
    if unit == "tokens/s" or abs(value) >= 10_000:
        return f"{value:,.0f}"
    return f"{value:.1f}"


@dataclass
class Figure:
    """One implementation's measurement."""

    impl: str
    value: float
    unit: str  # "MB/s", "MiB", "ms", "tokens/s", ...
    higher_is_better: bool = True
    seconds: Optional[float] = None  # shown beside the value when set
    tokens: Optional[int] = None  # size of the output, compared between ours and the peer
    rates: Dict[str, float] = field(default_factory=dict)  # shown beside a time: {"TFLOP/s": 412.3}
    shares: Dict[str, float] = field(default_factory=dict)  # {"detected": 0.42, "measured": ..., "V100": ...}
    share_basis: Optional[str] = None  # what the shares compare: "TFLOP/s bf16" or "GB/s"

    def __str__(self) -> str:
        text = f"{_number(self.value, self.unit)} {self.unit}"
        if self.seconds is not None:
            text += f" ({self.seconds:.2f} s)"
        if self.rates:
            text += " (" + ", ".join(f"{_number(v, u)} {u}" for u, v in self.rates.items()) + ")"
        return f"{text} {self.impl}" if self.impl != OURS_IMPL else text

    def to_dict(self) -> Dict[str, Any]:
        return {"impl": self.impl, "value": self.value, "unit": self.unit,
                "higher_is_better": self.higher_is_better, "seconds": self.seconds, "tokens": self.tokens,
                "rates": dict(self.rates), "shares": dict(self.shares), "share_basis": self.share_basis}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> Figure:
        if not isinstance(d, dict) or not isinstance(d.get("impl"), str) or not isinstance(d.get("unit"), str) \
                or not isinstance(d.get("value"), (int, float)) or isinstance(d.get("value"), bool):
            raise ValueError(f"a figure needs impl (text), value (a number) and unit (text), got {d!r}")
        return cls(d["impl"], float(d["value"]), d["unit"], bool(d.get("higher_is_better", True)),
                   d.get("seconds"), d.get("tokens"), dict(d.get("rates") or {}), dict(d.get("shares") or {}),
                   d.get("share_basis"))


@dataclass
class Row:
    """One comparison: ours beside a peer in the same run, and the goal for ours / peer."""

    benchmark: str
    ours: Optional[Figure] = None
    peer: Optional[Figure] = None
    goal: Optional[float] = None  # the ratio ours must reach (> 1: ours better by that factor)
    suite: str = ""

    @property
    def ratio(self) -> Optional[float]:
        """> 1 when ours is better: faster, higher throughput or less memory."""
        if self.ours is None or self.peer is None or not self.ours.value or not self.peer.value:
            return None
        if self.ours.higher_is_better:
            return self.ours.value / self.peer.value
        return self.peer.value / self.ours.value

    @property
    def met(self) -> Optional[bool]:
        ratio = self.ratio
        return None if self.goal is None or ratio is None else ratio >= self.goal

    @property
    def label(self) -> str:
        """The benchmark, with the implementations named when ours is not the plain "gpt2fast"."""
        if self.ours is None or self.ours.impl == OURS_IMPL:
            return self.benchmark
        return f"{self.benchmark}: {self.ours.impl}" + (f" vs {self.peer.impl}" if self.peer else "")

    def to_dict(self) -> Dict[str, Any]:
        return {"benchmark": self.benchmark, "suite": self.suite,
                "ours": self.ours.to_dict() if self.ours else None,
                "peer": self.peer.to_dict() if self.peer else None,
                "ratio": self.ratio, "goal": self.goal, "met": self.met}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> Row:
        if not isinstance(d, dict) or not isinstance(d.get("benchmark"), str):
            raise ValueError(f"a row needs a benchmark name, got {d!r}")
        goal = d.get("goal")
        if goal is not None and (not isinstance(goal, (int, float)) or isinstance(goal, bool)):
            raise ValueError(f"goal must be a number or null, got {goal!r}")
        return cls(d["benchmark"], Figure.from_dict(d["ours"]) if d.get("ours") is not None else None,
                   Figure.from_dict(d["peer"]) if d.get("peer") is not None else None, goal, d.get("suite") or "")


@dataclass
class Results:
    rows: List[Row]
    machine: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "machine": self.machine,
                "rows": [row.to_dict() for row in self.rows], "notes": list(self.notes)}


def write_results(path, results: Results) -> Path:
    """Write ``results`` as JSON; through a temporary file, so an earlier file is never left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(results.to_dict(), indent=1, default=str) + "\n").encode("utf-8"))
    return path


def load_results(path) -> Results:
    """Read a results file written by the benchmark suites; BenchReportError says what is wrong with it."""
    path = Path(path)
    rerun = "run `pytest benchmarks/` (it writes .benchmarks/gpt2fast-results.json) and pass the file it wrote"
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise BenchReportError(f"{path} {what}; {rerun}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchReportError(f"{path} is not a JSON file ({e}); {rerun}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BenchReportError(f"{path} is not a gpt2fast benchmark results file (it has no "
                               f"\"format\": \"{FORMAT}\"); {rerun}")
    if not isinstance(data.get("version"), int) or data["version"] > VERSION:
        raise BenchReportError(f"{path} has results format version {data.get('version')!r}; this gpt2fast reads "
                               f"version {VERSION} and older: update gpt2fast or re-run the benchmarks with it")
    if not isinstance(data.get("rows"), list):
        raise BenchReportError(f"{path}: \"rows\" must be a list; {rerun}")
    rows = []
    for i, row in enumerate(data["rows"]):
        try:
            rows.append(Row.from_dict(row))
        except ValueError as e:
            raise BenchReportError(f"{path}: row {i} is malformed: {e}; {rerun}") from None
    machine = data.get("machine") if isinstance(data.get("machine"), dict) else {}
    notes = [str(n) for n in data.get("notes") or []]
    return Results(rows, machine, notes)


# ----------------------------------------------------------------------------------------- tables
def _share_keys(rows: Sequence[Row], keys: Sequence[str]) -> List[str]:
    return [k for k in keys if any(r.ours is not None and k in r.ours.shares for r in rows)]


def _share_cell(figure: Optional[Figure], key: str) -> str:
    if figure is None or key not in figure.shares:
        return "-"
    basis = (figure.share_basis or "").split()[0]
    return f"{figure.shares[key]:.0%}" + (f" {basis}" if basis else "")


def table(rows: Sequence[Row], share_keys: Sequence[str] = ("detected", "measured")) -> List[List[str]]:
    """Header and one line of cells per row: benchmark, ours, peer, ratio, goal, met, then the shares of peak
    in ``share_keys`` that any row has (none for the tokenizer, so its table keeps six columns)."""
    keys = _share_keys(rows, share_keys)
    lines = [["benchmark", "ours", "peer", "ratio", "goal", "met"] + [f"% {SHARE_COLUMNS[k]}" for k in keys]]
    for row in rows:
        ratio, met = row.ratio, row.met
        lines.append([row.benchmark, str(row.ours or "-"), str(row.peer or "-"),
                      "-" if ratio is None else f"{ratio:.2f}x",
                      "-" if row.goal is None else f">= {row.goal:g}x",
                      "" if met is None else ("yes" if met else "NO")]
                     + [_share_cell(row.ours, k) for k in keys])
    return lines


def text_table(rows: Sequence[Row]) -> List[str]:
    """The table as aligned plain-text lines (the end-of-session summary)."""
    cells = table(rows)
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def _md(cell: str) -> str:
    return cell.replace("|", "\\|")


def machine_lines(machine: Dict[str, Any]) -> List[str]:
    """One short line per fact about where the results were measured."""
    m = machine
    lines = []
    gpu = m.get("gpu") or "none"
    if m.get("gpu_peak"):
        gpu += f" (peak table: {m['gpu_peak']})"
    lines.append(f"GPU: {gpu}; CPUs: {m.get('cpu_count', '?')}" + (f" ({m['cpu']})" if m.get("cpu") else ""))
    ceilings = m.get("measured_ceilings") or {}
    if ceilings:
        lines.append("measured ceilings: " + ", ".join(f"{k} {v}" for k, v in ceilings.items()))
    versions = ", ".join(f"{k} {m[k]}" for k in ("python", "torch", "triton") if m.get(k))
    if versions:
        lines.append(f"versions: {versions}")
    run = [f"{k.replace('_', ' ')}: {m[k]}" for k in ("date", "commit", "mode", "timing", "gpu_timing") if m.get(k)]
    if run:
        lines.append("; ".join(run))
    return lines


def render_markdown(results: Results) -> str:
    out = ["# gpt2fast benchmarks", ""]
    out += [f"- {line}" for line in machine_lines(results.machine)]
    out += ["- ratio: ours / peer, > 1 means ours is better (faster, higher throughput or less memory)", ""]
    if not results.rows:
        out.append("No benchmark rows (every suite was skipped or deselected).")
    else:
        cells = table(results.rows, share_keys=tuple(SHARE_COLUMNS))
        out.append("| " + " | ".join(cells[0]) + " |")
        out.append("|" + "|".join(" --- " for _ in cells[0]) + "|")
        out += ["| " + " | ".join(_md(c) if c else " " for c in line) + " |" for line in cells[1:]]
    if results.notes:
        out += ["", "Notes:", ""] + [f"- {_md(note)}" for note in results.notes]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------ chart
def render_png(results: Results, path) -> Path:
    """A bar chart: ours / peer per comparison (a line at 1, each goal marked) and, for rows with shares of
    peak, those shares (a line at 100%). Drawn with matplotlib's Agg canvas, no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    ratio_rows = [r for r in results.rows if r.ratio is not None]
    share_rows = list({(r.benchmark, r.ours.impl): r for r in results.rows  # each of our figures once
                       if r.ours is not None and _share_keys([r], ("detected", "measured"))}.values())
    panels = [p for p in (ratio_rows, share_rows) if p] or [[]]
    height = 1.2 + sum(0.28 * max(len(p), 2) + 0.8 for p in panels)
    fig = MplFigure(figsize=(10, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False,
                        gridspec_kw={"height_ratios": [max(len(p), 2) for p in panels]})[:, 0]
    ax_iter = iter(axes)
    if ratio_rows:
        _ratio_panel(next(ax_iter), ratio_rows)
    if share_rows:
        _share_panel(next(ax_iter), share_rows)
    if not results.rows or not (ratio_rows or share_rows):
        ax = axes[0]
        ax.axis("off")
        ax.text(0.5, 0.5, "no comparisons to chart", ha="center", va="center")
    title = "gpt2fast benchmarks"
    gpu = results.machine.get("gpu")
    title += f" ({gpu})" if gpu else f" ({results.machine.get('cpu_count', '?')} CPUs, no GPU)"
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _wrap(label: str, width: int = 50) -> str:
    return textwrap.fill(label, width)


def _ratio_panel(ax, rows: Sequence[Row]) -> None:
    ratios = [r.ratio for r in rows]
    colors = ["tab:gray" if r.met is None else ("tab:green" if r.met else "tab:red") for r in rows]
    ys = list(range(len(rows)))
    ax.barh(ys, ratios, color=colors)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    goals = [(r.goal, y) for r, y in zip(rows, ys) if r.goal is not None]
    if goals:
        ax.scatter([g for g, _ in goals], [y for _, y in goals], marker="D", s=30, color="gold",
                   edgecolors="black", zorder=3, label="goal")
        ax.legend(loc="lower right", fontsize=8)
    for y, ratio in zip(ys, ratios):
        ax.text(ratio, y, f" {ratio:.2f}x", va="center", fontsize=7)
    if max(ratios) / max(min(ratios), 1e-9) > 30:
        ax.set_xscale("log")
    ax.set_yticks(ys)
    ax.set_yticklabels([_wrap(r.label) for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ours / peer (> 1: ours better); green: goal met, red: not met, grey: no goal")


def _share_panel(ax, rows: Sequence[Row]) -> None:
    ys = list(range(len(rows)))
    for offset, key, color in ((-0.2, "detected", "tab:blue"), (0.2, "measured", "tab:orange")):
        values = [100 * r.ours.shares.get(key, math.nan) for r in rows]
        ax.barh([y + offset for y in ys], values, height=0.4, color=color, label=f"% {SHARE_COLUMNS[key]}")
    ax.axvline(100, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(ys)
    ax.set_yticklabels([_wrap(f"{r.benchmark}: {r.ours.impl} ({r.ours.share_basis or '?'})") for r in rows],
                       fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ours, % of peak")
    ax.legend(loc="lower right", fontsize=8)


# -------------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpt2fast.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="render a results JSON as a Markdown table and a bar chart PNG")
    r.add_argument("results", nargs="?", default=str(DEFAULT_RESULTS),
                   help=f"the JSON the benchmarks wrote (default {DEFAULT_RESULTS})")
    r.add_argument("--markdown", metavar="FILE", help="write the Markdown here instead of printing it")
    r.add_argument("--png", metavar="FILE", help="write the chart here (default: next to the JSON, .png)")
    r.add_argument("--out", metavar="PREFIX", help="write PREFIX.md and PREFIX.png")
    r.add_argument("--no-png", action="store_true", help="no chart")
    return p


def report(args) -> int:
    results = load_results(args.results)
    markdown = render_markdown(results)
    md_path = args.markdown or (f"{args.out}.md" if args.out else None)
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(md_path), markdown.encode("utf-8"))
        print(f"markdown: {md_path}", file=sys.stderr)
    else:
        sys.stdout.write(markdown)
    if not args.no_png:
        png = args.png or (f"{args.out}.png" if args.out else Path(args.results).with_suffix(".png"))
        try:
            print(f"chart: {render_png(results, png)}", file=sys.stderr)
        except ImportError as e:
            raise BenchReportError(f"the chart needs matplotlib ({e}): pip install matplotlib, "
                                   "or pass --no-png") from None
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return report(args)
    except (BenchReportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
