"""gpt2fast.bench (results JSON, Markdown and PNG report), gpt2fast.hardware (peaks, shares of peak) and the
benchmarks' recording helpers, all without a GPU: the GPU timing is replaced by fixed figures."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt2fast import bench, compute, hardware
from gpt2fast.bench import BenchReportError, Figure, Results, Row, load_results, main, render_markdown, write_results

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ peaks
def test_reference_peaks_are_the_issues_figures():
    v100, a100, h100 = (hardware.REFERENCE_GPUS[k] for k in ("V100", "A100", "H100"))
    assert (v100.bf16, v100.fp32, v100.gb_per_s, v100.tf32) == (125, 15.7, 900, None)
    assert (a100.bf16, a100.tf32, a100.fp32, a100.gb_per_s) == (312, 156, 19.5, 2039)
    assert (h100.bf16, h100.gb_per_s) == (989, 3350)


def test_compute_planning_uses_the_same_peaks():
    for key, gpu in hardware.PLANNING_GPUS.items():
        assert compute.GPU_PEAK_FLOPS[key] == gpu.bf16 * 1e12
        assert compute.GPU_MEMORY_BYTES[key] == gpu.memory_gb * 1e9
    assert compute.GPU_PEAK_FLOPS["H100"] == 989e12 and compute.GPU_MEMORY_BYTES["H200"] == 141e9


@pytest.mark.parametrize("device_name, expected", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100 SXM 40GB"),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"),
    ("Tesla V100-SXM2-32GB", "V100 SXM2"),
    ("Tesla V100-PCIE-16GB", "V100 PCIe"),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_detect_gpu_by_device_name(device_name, expected):
    peak = hardware.detect_gpu(device_name)
    assert (peak.name if peak else None) == expected


def test_peak_shares_of_a_tflops_figure():
    shares = hardware.peak_shares(tflop_s=494.5, detected=hardware.H100_SXM, measured=742.0)
    assert shares == {"detected": 0.5, "measured": round(494.5 / 742.0, 4), "V100": round(494.5 / 125, 4),
                      "A100": round(494.5 / 312, 4), "H100": 0.5}


def test_peak_shares_of_a_bandwidth_figure_without_a_detected_gpu():
    shares = hardware.peak_shares(gb_s=1675.0, measured=3000.0)
    assert shares == {"measured": round(1675 / 3000, 4), "V100": round(1675 / 900, 4),
                      "A100": round(1675 / 2039, 4), "H100": 0.5}


def test_peak_shares_leave_out_unknown_ceilings():
    shares = hardware.peak_shares(tflop_s=78.0, precision="tf32", detected=hardware.A100_SXM_80GB)
    assert shares == {"detected": 0.5, "A100": 0.5, "H100": round(78 / 494.5, 4)}  # no TF32 on a V100
    assert hardware.share(1.0, None) is None and hardware.share(None, 2.0) is None and hardware.share(1, 0) is None


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one"),
    ({"tflop_s": 1.0, "gb_s": 1.0}, "exactly one"),
    ({"tflop_s": 1.0, "precision": "fp8", "detected": hardware.H100_SXM}, "unknown precision 'fp8'"),
])
def test_peak_shares_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hardware.peak_shares(**kwargs)


# ------------------------------------------------------------------------------------------- rows
def test_ratio_points_the_way_of_the_unit():
    faster = Row("op", Figure("ours (triton)", 0.5, "ms", False), Figure("torch", 1.5, "ms", False), goal=3.0)
    assert faster.ratio == pytest.approx(3.0) and faster.met is True
    slower = Row("enc", Figure("gpt2fast", 10.0, "MB/s"), Figure("tiktoken", 20.0, "MB/s"), goal=1.0)
    assert slower.ratio == pytest.approx(0.5) and slower.met is False
    assert Row("only ours", Figure("gpt2fast", 1.0, "MB/s")).ratio is None
    assert Row("no goal", Figure("gpt2fast", 1.0, "MB/s"), Figure("x", 1.0, "MB/s")).met is None


def _synthetic() -> Results:
    shares = {"detected": 0.42, "measured": 0.6, "V100": 3.32, "A100": 1.33, "H100": 0.42}
    return Results(
        rows=[
            Row("encode_ordinary, 1 thread", Figure("gpt2fast", 75.1, "MB/s", tokens=10),
                Figure("tiktoken", 17.4, "MB/s", tokens=10), goal=3.0, suite="tokenizer"),
            Row("RSS of loaded GPT-2 tokenizer", Figure("gpt2fast", 12.2, "MiB", False),
                Figure("tiktoken", 24.8, "MiB", False), goal=1.0, suite="tokenizer"),
            Row("attention forward B16-H12-T1024-D64",
                Figure("ours (triton)", 0.2, "ms", False, rates={"TFLOP/s": 412.3}, shares=shares,
                       share_basis="TFLOP/s bf16"),
                Figure("SDPA", 0.1, "ms", False, rates={"TFLOP/s": 824.6}), goal=1.0, suite="attention"),
            Row("pathological 'a' x 1e6", Figure("gpt2fast", 5.6, "MB/s"), None, suite="tokenizer"),
        ],
        machine={"gpu": "NVIDIA H100 80GB HBM3", "gpu_peak": "H100 SXM", "cpu_count": 16, "torch": "2.11.0",
                 "date": "2026-11-26T10:00:00+00:00", "commit": "abc123", "mode": "quick",
                 "measured_ceilings": {"bf16 matmul 8192^3": "687.2 TFLOP/s"}},
        notes=["linear time 'a': ns/char 1e6 / 1e4 = 1.31"])


@pytest.fixture
def results_json(tmp_path) -> Path:
    return write_results(tmp_path / "run" / "results.json", _synthetic())


def _table_lines(markdown: str) -> list:
    return [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| ---")]


def test_markdown_has_one_row_per_comparison_with_ratios(results_json):
    markdown = render_markdown(load_results(results_json))
    header, *rows = _table_lines(markdown)
    assert header.split(" | ")[:6] == ["| benchmark", "ours", "peer", "ratio", "goal", "met"]
    assert "% of GPU peak" in header and "% of measured ceiling" in header and "% of V100" in header
    assert len(rows) == 4
    assert rows[0].startswith("| encode_ordinary, 1 thread | 75.1 MB/s | 17.4 MB/s tiktoken | 4.32x | >= 3x | yes |")
    assert rows[1].startswith("| RSS of loaded GPT-2 tokenizer | 12.2 MiB | 24.8 MiB tiktoken | 2.03x | >= 1x | yes |")
    cells = [c.strip() for c in rows[2].strip("|").split("|")]
    assert cells[:6] == ["attention forward B16-H12-T1024-D64", "0.200 ms (412.3 TFLOP/s) ours (triton)",
                         "0.100 ms (824.6 TFLOP/s) SDPA", "0.50x", ">= 1x", "NO"]
    assert cells[6:] == ["42% TFLOP/s", "60% TFLOP/s", "332% TFLOP/s", "133% TFLOP/s", "42% TFLOP/s"]
    assert rows[3].startswith("| pathological 'a' x 1e6 | 5.6 MB/s | - | - | - |")
    assert "NVIDIA H100 80GB HBM3" in markdown and "687.2 TFLOP/s" in markdown and "abc123" in markdown
    assert "- linear time 'a': ns/char 1e6 / 1e4 = 1.31" in markdown


def test_text_table_of_tokenizer_rows_keeps_six_columns():
    lines = bench.text_table([r for r in _synthetic().rows if r.suite == "tokenizer"])
    assert lines[0].split() == ["benchmark", "ours", "peer", "ratio", "goal", "met"]
    assert lines[2].split() == ["encode_ordinary,", "1", "thread", "75.1", "MB/s", "17.4", "MB/s", "tiktoken",
                                "4.32x", ">=", "3x", "yes"]


def test_json_round_trip(results_json):
    data = json.loads(results_json.read_text())
    assert data["format"] == bench.FORMAT and data["version"] == bench.VERSION
    assert data["rows"][0]["ratio"] == pytest.approx(75.1 / 17.4) and data["rows"][0]["met"] is True
    loaded = load_results(results_json)
    assert [r.to_dict() for r in loaded.rows] == [r.to_dict() for r in _synthetic().rows]
    assert loaded.machine["gpu_peak"] == "H100 SXM" and loaded.notes == _synthetic().notes
    assert not list(results_json.parent.glob("*.partial"))


def test_report_prints_markdown_and_writes_a_png_next_to_the_json(results_json, capsys):
    assert main(["report", str(results_json)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("# gpt2fast benchmarks") and "| encode_ordinary, 1 thread |" in out
    png = results_json.with_suffix(".png")
    assert str(png) in err
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000


def test_report_to_files(results_json, tmp_path, capsys):
    assert main(["report", str(results_json), "--out", str(tmp_path / "out" / "report")]) == 0
    assert capsys.readouterr().out == ""
    assert (tmp_path / "out" / "report.md").read_text().startswith("# gpt2fast benchmarks")
    assert (tmp_path / "out" / "report.png").read_bytes().startswith(PNG_SIGNATURE)
    md, png = tmp_path / "table.md", tmp_path / "chart.png"
    assert main(["report", str(results_json), "--markdown", str(md), "--png", str(png)]) == 0
    assert md.read_text() == (tmp_path / "out" / "report.md").read_text()
    assert png.read_bytes().startswith(PNG_SIGNATURE)


def test_report_without_png_and_with_no_rows(tmp_path, capsys):
    path = write_results(tmp_path / "empty.json", Results([], {"cpu_count": 2}))
    assert main(["report", str(path), "--no-png"]) == 0
    assert "No benchmark rows" in capsys.readouterr().out
    assert not path.with_suffix(".png").exists()
    assert bench.render_png(load_results(path), tmp_path / "empty.png").read_bytes().startswith(PNG_SIGNATURE)


def _bad(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.json", "does not exist"),
    (lambda d: d, "is a directory"),
    (lambda d: _bad(d, "broken.json", '{"format": "gpt2fast-'), "is not a JSON file"),
    (lambda d: _bad(d, "pytest-benchmark.json", '{"machine_info": {}, "benchmarks": []}'),
     "is not a gpt2fast benchmark results file"),
    (lambda d: _bad(d, "list.json", "[1, 2]"), "is not a gpt2fast benchmark results file"),
    (lambda d: _bad(d, "future.json", json.dumps({"format": bench.FORMAT, "version": 99, "rows": []})),
     "format version 99"),
    (lambda d: _bad(d, "rows.json", json.dumps({"format": bench.FORMAT, "version": 1, "rows": {}})),
     '"rows" must be a list'),
    (lambda d: _bad(d, "row.json", json.dumps({"format": bench.FORMAT, "version": 1,
                                              "rows": [{"benchmark": "x", "ours": {"impl": "a", "value": "fast"}}]})),
     "row 0 is malformed"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, make, message):
    path = make(tmp_path)
    with pytest.raises(BenchReportError, match=message):
        load_results(path)
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and message in err
    assert "pytest benchmarks/" in err or "update gpt2fast" in err


def test_write_results_replaces_the_file_whole(tmp_path):
    path = write_results(tmp_path / "r.json", _synthetic())
    write_results(path, Results([], {}))
    assert load_results(path).rows == []


# ------------------------------------------------------------------- the benchmarks' recording helpers
@pytest.fixture
def recorder(monkeypatch):
    """benchmarks/bench_results with empty state (restored after, in case the benchmarks share the session)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_results

    monkeypatch.setattr(bench_results, "GROUPS", {})
    monkeypatch.setattr(bench_results, "NOTES", [])
    monkeypatch.setattr(bench_results, "SESSION", {"corpus": None, "timing": None, "gpu_timing": None, "gpu": None,
                                                   "gpu_peak": None, "measured_ceilings": {}})
    return bench_results


def test_rows_pair_every_ours_with_every_peer(recorder):
    ms = lambda impl, v: Figure(impl, v, "ms", False)  # noqa: E731
    recorder.record("ce", "ours", ms("ours (triton)", 1.0), goal=3.0, goal_peer="stock", suite="ce")
    recorder.record("ce", "ours", ms("ours (cuda)", 2.0), suite="ce")
    recorder.record("ce", "peer", ms("stock", 4.0), suite="ce")
    recorder.record("ce", "peer", ms("torch.compile", 2.0), suite="ce")
    recorder.record("enc", "ours", Figure("gpt2fast", 30.0, "MB/s"), goal=2.0)
    recorder.record("enc", "peer", Figure("tiktoken", 10.0, "MB/s"), goal=2.0)
    recorder.record("long", "ours", Figure("gpt2fast", 5.0, "MB/s"))
    got = [(r.benchmark, r.ours.impl, r.peer.impl if r.peer else None, r.ratio, r.goal)
           for r in recorder.rows()]
    assert got == [("ce", "ours (triton)", "stock", 4.0, 3.0), ("ce", "ours (triton)", "torch.compile", 2.0, None),
                   ("ce", "ours (cuda)", "stock", 2.0, 3.0), ("ce", "ours (cuda)", "torch.compile", 1.0, None),
                   ("enc", "gpt2fast", "tiktoken", 3.0, 2.0), ("long", "gpt2fast", None, None, None)]
    with pytest.raises(ValueError, match="role"):
        recorder.record("x", "mine", Figure("a", 1.0, "ms"))


def test_json_path_option_then_env_then_default(recorder, monkeypatch, tmp_path):
    monkeypatch.delenv(recorder.JSON_ENV, raising=False)
    assert recorder.json_path(None) == REPO / ".benchmarks" / "gpt2fast-results.json"
    monkeypatch.setenv(recorder.JSON_ENV, str(tmp_path / "env.json"))
    assert recorder.json_path(None) == tmp_path / "env.json"
    assert recorder.json_path(str(tmp_path / "opt.json")) == tmp_path / "opt.json"


def test_write_json_carries_machine_info(recorder, tmp_path):
    recorder.record("enc", "ours", Figure("gpt2fast", 30.0, "MB/s"))
    recorder.SESSION["measured_ceilings"]["device copy 1 GiB"] = "2950 GB/s"
    loaded = load_results(recorder.write_json(tmp_path / "r.json", quick=True))
    m = loaded.machine
    assert m["mode"] == "quick" and m["cpu_count"] >= 1 and m["python"] and m["date"]
    assert m["measured_ceilings"] == {"device copy 1 GiB": "2950 GB/s"}
    assert "torch" in m and "commit" in m and "gpu" in m
    assert [r.benchmark for r in loaded.rows] == ["enc"]


def test_gpu_report_shares_and_recorded_figure(recorder, monkeypatch):
    """gpu_timing.report's arithmetic with the GPU parts replaced: an H100, measured ceilings fixed."""
    torch = pytest.importorskip("torch")
    import gpu_timing

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(gpu_timing, "gpu_peak", lambda device: hardware.H100_SXM)
    monkeypatch.setattr(gpu_timing, "measured_ceilings", lambda device: gpu_timing.Ceilings(800.0, 3000.0))

    flops = gpu_timing.report(None, "matmul-ish", 2.0, flops=989e9)  # 494.5 TFLOP/s
    assert flops["TFLOP/s"] == 494.5 and flops["share_basis"] == "TFLOP/s bf16" and flops["gpu"] == "H100 SXM"
    assert flops["shares"] == hardware.peak_shares(tflop_s=494.5, detected=hardware.H100_SXM, measured=800.0)
    memory = gpu_timing.report(None, "copy-ish", 1.0, bytes=3350e6, copy_bandwidth=3000.0)
    assert memory["GB/s"] == 3350.0 and memory["share_basis"] == "GB/s"
    assert memory["shares"]["detected"] == 1.0 and memory["shares"]["measured"] == round(3350 / 3000, 4)
    assert memory["share_of_copy_bandwidth"] == round(3350 / 3000, 3)
    fp32 = gpu_timing.report(None, "fp32", 1.0, flops=9.75e9, precision="fp32")
    assert "measured" not in fp32["shares"] and fp32["shares"]["A100"] == 0.5  # the bf16 matmul is no fp32 ceiling

    gpu_timing.record_figures("g", "ours", "ours (triton)", flops, suite="s", goal=1.0)
    gpu_timing.record_figures("g", "peer", "SDPA", memory, suite="s")
    (row,) = recorder.rows()
    assert row.ours.unit == "ms" and not row.ours.higher_is_better and row.ours.rates == {"TFLOP/s": 494.5}
    assert row.ours.shares["H100"] == 0.5 and row.ratio == pytest.approx(0.5) and row.met is False
    tokens = gpu_timing.record_figures("t", "ours", "ours (eager)", flops, suite="train", value=6e5,
                                       unit="tokens/s", higher_is_better=True)
    assert str(tokens) == "600,000 tokens/s (494.5 TFLOP/s) ours (eager)"
