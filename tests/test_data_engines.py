"""Where prepare's work runs (issue 14): local worker processes or a Ray cluster, with byte-identical output.

The Ray test runs on a local Ray instance; it is skipped where Ray is not installed, except when
GPT2FAST_REQUIRE_RAY=1 (CI sets it, having installed the extra), where a missing Ray is a failure."""
from __future__ import annotations

import json
import os
import random
import sys

import pytest
from data_testing import doc

from gpt2fast.data import ConfigError, DataError, PrepareOptions, main, prepare
from gpt2fast.data.engine import RAY_EXTRA


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    rng = random.Random(11)
    root = tmp_path_factory.mktemp("engines")
    texts = [doc(rng, 120) for _ in range(60)]
    texts += [t.replace(" ", "  ", 1).replace(".", "!", 2) for t in texts[:10]]  # near-copies
    texts += texts[:5]  # exact copies
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return [path]


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_engine_ray_without_ray_names_the_extra(inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` raises ImportError
    with pytest.raises(DataError, match=r'--engine ray needs Ray.*pip install "gpt2fast\[ray\]"'):
        prepare(inputs, tmp_path / "out", PrepareOptions(engine="ray"), log=lambda s: None)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert main(["prepare", str(inputs[0]), "--out", str(tmp_path / "cli"), "--engine", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and RAY_EXTRA in err and "Traceback" not in err


def test_an_unknown_engine_is_refused():
    with pytest.raises(ConfigError, match=r"engine='spark'.*'local' or 'ray'"):
        PrepareOptions(engine="spark")


def test_ray_output_is_byte_identical_to_local(inputs, tmp_path):
    if os.environ.get("GPT2FAST_REQUIRE_RAY") != "1":
        pytest.importorskip("ray")
    opts = dict(min_chars=50, val_fraction=0.2, shard_tokens=4000, batch_docs=9)
    local = prepare(inputs, tmp_path / "local", PrepareOptions(**opts, workers=1), log=lambda s: None)
    said = []
    on_ray = prepare(inputs, tmp_path / "ray", PrepareOptions(**opts, engine="ray", workers=2), log=said.append)
    assert on_ray == local
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert any("ray engine, 2 worker(s)" in s for s in said)
    stages = {s["name"]: s for s in local["stages"]}
    assert stages["exact_dedup"]["dropped_by"] == {"duplicate": 5}
    assert stages["near_dedup"]["dropped_by"] == {"near_duplicate": 10}
    assert not (tmp_path / "ray" / ".prepare-work").exists()


def test_a_progress_bar_per_pass_only_when_asked_or_on_a_terminal(inputs, tmp_path, capsys):
    prepare(inputs, tmp_path / "quiet", PrepareOptions(min_chars=50, workers=1), log=lambda s: None)
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no bar
    prepare(inputs, tmp_path / "shown", PrepareOptions(min_chars=50, workers=1), log=lambda s: None, progress=True)
    err = capsys.readouterr().err
    for bar in ("filter, hash, tokenize", "near-dedup partitions", "write shards"):
        assert bar in err, bar
    assert "MB/s" in err and "docs" in err


def test_more_documents_than_32_bits_number_is_a_clear_error(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr("gpt2fast.data.pipeline.MAX_DOCUMENTS", 30)  # the real limit is 2**32 - 1
    with pytest.raises(DataError, match=r"more than 30 input documents in one run.*in parts"):
        prepare(inputs, tmp_path / "out", PrepareOptions(min_chars=50, workers=1), log=lambda s: None)
    assert not (tmp_path / "out" / "manifest.json").exists()
