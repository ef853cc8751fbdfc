"""The funnel: how many documents and bytes each stage kept, as a text table (printed, and by ``info``) and as
the ``funnel.png`` beside the shards, like the picture of WebText's pipeline.

matplotlib is imported only to draw the picture."""
from __future__ import annotations

import io

import numpy as np


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f}"


def funnel_table(manifest: dict) -> str:
    """The stage counts as a text table, and the splits below it."""
    rows = [("stage", "docs in", "docs out", "kept %", "MB in", "MB out", "dropped because")]
    for st in manifest["stages"]:
        kept = f"{100 * st['docs_out'] / st['docs_in']:.1f}" if st["docs_in"] else "-"
        why = ", ".join(f"{k} {v:,}" for k, v in st.get("dropped_by", {}).items())
        if st.get("boilerplate_lines_removed"):
            why = (why + ", " if why else "") + f"({st['boilerplate_lines_removed']:,} boilerplate lines cut)"
        if "tokens" in st:
            why = f"{st['tokens']:,} tokens"
        rows.append((st["label"], f"{st['docs_in']:,}", f"{st['docs_out']:,}", kept, _mb(st["bytes_in"]),
                     _mb(st["bytes_out"]), why))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1])] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("-" * len(lines[0]))
    for name, sp in manifest["splits"].items():
        lines.append(f"{name}: {sp['documents']:,} documents, {sp['tokens']:,} tokens in {len(sp['shards'])} "
                     f"shard(s)")
    lines += _unreadable_lines(manifest.get("unreadable") or {})  # absent from manifests of before it was counted
    return "\n".join(lines)


def _unreadable_lines(unreadable: dict) -> list:
    """The input records that could not be read, by file (the input stage counts them as dropped, by reason)."""
    if not unreadable.get("records"):
        return []
    lines = [f"unreadable records skipped: {unreadable['records']:,}"]
    for f in unreadable.get("files", []):
        text = f"  {f.get('path')}: " + ", ".join(f"{k} {v:,}" for k, v in f.get("by_reason", {}).items())
        shown = f.get("lines", [])
        if shown:
            more = " ..." if len(shown) < f.get("records", 0) else ""
            text += f" (line {', '.join(map(str, shown[:10]))}{' ...' if len(shown) > 10 else more})"
        if "rest_lost_after_line" in f:
            after = f["rest_lost_after_line"]
            text += f"; the rest of the file after line {after:,} is lost" if after else "; nothing of it was read"
        lines.append(text)
    return lines


def funnel_plot_png(manifest: dict) -> bytes:
    """Horizontal bars, one per stage: documents and MB kept."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    stages = manifest["stages"]
    labels = [s["label"] for s in stages]
    docs = [s["docs_out"] for s in stages]
    top_bytes = max(s["bytes_out"] for s in stages)
    scale, unit = next((f, u) for f, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB"), (1, "bytes"))
                       if top_bytes >= f or f == 1)
    sizes = [s["bytes_out"] / scale for s in stages]
    fig = Figure(figsize=(11, 0.45 * len(stages) + 1.6))
    ax_docs, ax_mb = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(stages))[::-1]
    for ax, values, title, fmt, colour in ((ax_docs, docs, "documents kept", "{:,.0f}", "#4c72b0"),
                                           (ax_mb, sizes, f"{unit} of text kept", "{:,.2f}", "#dd8452")):
        ax.barh(y, values, color=colour)
        top = max(values) if values and max(values) > 0 else 1
        ax.set_xlim(0, top * 1.25)
        for yi, v in zip(y, values):
            ax.text(v + top * 0.01, yi, fmt.format(v), va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    ax_docs.set_yticks(y)
    ax_docs.set_yticklabels(labels, fontsize=8)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    fig.suptitle(f"gpt2fast data pipeline: {stages[-1].get('tokens', 0):,} tokens "
                 f"(train {train['tokens']:,}, val {val['tokens']:,})", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
