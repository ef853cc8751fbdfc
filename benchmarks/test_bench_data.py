"""The data pipeline's throughput: ``prepare`` with one worker and with every core, beside Hugging Face
datatrove's comparable pipeline (benchmarks/datatrove_peer.py) with as many workers, on the same files.

    pytest benchmarks/test_bench_data.py --benchmark-only -s

Figures are MB/s of input text (UTF-8). Goals (issue 14): with 2 workers, >= 1.8x our one-worker throughput;
and >= 8x datatrove's one-worker throughput per core. datatrove's test skips when it is not installed
(its setup line is in datatrove_peer.py). Quick mode runs ours on one small file only."""
from __future__ import annotations

import gzip
import json
import tempfile
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import datatrove_peer
import pytest
from conftest import CORPUS_DIR, QUICK

from gpt2fast.data import PrepareOptions, prepare
from gpt2fast.data.engine import default_workers

GOAL_SCALING = 1.8  # 2 workers over 1 (reported in the notes)
GOAL_PER_CORE = 8.0  # ours per core over datatrove with one worker
WORKERS = sorted({1, default_workers()})
RESULTS = {}  # (role, workers) -> MB/s
_NOTED = set()


def _files():
    files = sorted(CORPUS_DIR.glob("*.jsonl.gz"))
    if QUICK or not files:
        return [Path(str(resources.files("gpt2fast") / "assets" / "mobydick.jsonl.gz"))]
    return files


def _text_bytes(files) -> int:
    total = 0
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            total += sum(len(json.loads(line)["text"].encode("utf-8")) for line in fh if line.strip())
    return total


@pytest.fixture(scope="module")
def inputs():
    files = _files()
    return files, _text_bytes(files)


def _note_goals(measure):
    ours = {w: v for (role, w), v in RESULTS.items() if role == "ours"}
    if 1 in ours and len(ours) == len(WORKERS) > 1 and "scaling" not in _NOTED:
        _NOTED.add("scaling")
        top = max(ours)
        measure.summary_note(f"prepare scaling: {top} workers {ours[top]:.2f} MB/s = {ours[top] / ours[1]:.2f}x one "
                             f"worker's {ours[1]:.2f} MB/s (goal >= {GOAL_SCALING}x with 2)")
    if 1 in ours and ("peer", 1) in RESULTS and "per core" not in _NOTED:
        _NOTED.add("per core")
        measure.summary_note(f"prepare per core: ours {ours[1]:.2f} MB/s = {ours[1] / RESULTS['peer', 1]:.1f}x "
                             f"datatrove's {RESULTS['peer', 1]:.2f} MB/s with one worker (goal >= {GOAL_PER_CORE}x)")


@pytest.mark.parametrize("workers", WORKERS, ids=lambda w: f"{w}w")
def test_prepare_ours(inputs, workers, measure):
    files, nbytes = inputs
    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    opts = PrepareOptions(workers=workers)

    def run():
        return prepare(files, tmp / "out", opts, force=True, log=lambda s: None, progress=False)

    who = SimpleNamespace(name="gpt2fast prepare", role="ours")
    seconds, manifest = measure.throughput(run, who, group=f"prepare, {workers} worker(s)", peer="datatrove",
                                           nbytes=nbytes, rounds=1 if QUICK else 3, warmup_rounds=0)
    assert manifest["stages"][0]["bytes_in"] == nbytes
    measure.note(workers=workers, kept=manifest["stages"][-1]["docs_out"])
    RESULTS["ours", workers] = nbytes / 1e6 / seconds
    _note_goals(measure)


@pytest.mark.parametrize("workers", WORKERS, ids=lambda w: f"{w}w")
def test_prepare_datatrove(inputs, workers, measure):
    if not datatrove_peer.available():
        pytest.skip("datatrove (and spacy, ftfy, xxhash, tokenizers) not installed, or no local GPT-2 vocabulary: "
                    "see benchmarks/datatrove_peer.py")
    files, nbytes = inputs
    tmp = Path(tempfile.mkdtemp(prefix="bench-datatrove-"))
    who = SimpleNamespace(name="datatrove", role="peer")
    seconds, result = measure.throughput(lambda: datatrove_peer.run_datatrove(files, tmp, workers), who,
                                         group=f"prepare, {workers} worker(s)", peer="datatrove", nbytes=nbytes,
                                         rounds=1)
    measure.note(workers=workers, kept=result["docs_out"], left_out=result.get("left_out"))
    RESULTS["peer", workers] = nbytes / 1e6 / seconds
    _note_goals(measure)
