"""Memory that stays small (issue 14): prepare's peak resident memory grows by at most ~300 bytes per kept
document, measured between synthetic corpora of 50,000 and 200,000 documents with planted near-duplicates
(tools/data_scale.py, which the README's planning figures come from)."""
from __future__ import annotations

import importlib.util

import pytest
from conftest import REPO

_spec = importlib.util.spec_from_file_location("data_scale", REPO / "tools" / "data_scale.py")
data_scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(data_scale)


@pytest.mark.timeout(900)
def test_memory_per_kept_document_between_50k_and_200k_documents(tmp_path):
    runs = []
    for n in (50_000, 200_000):
        src = tmp_path / f"synthetic_{n}.jsonl.gz"
        planted = data_scale.synthetic_corpus(src, n)
        run = data_scale.measure(src, tmp_path / f"out_{n}", workers=2)
        assert run["docs"] == n and run["quality_passed"] == n
        # the planted copies at Jaccard >= 0.8 (one word changed; two words changed fall below it) are found
        assert 0.4 * planted < run["near_dropped"] <= planted
        runs.append(run)
    s = data_scale.slope(*runs)
    print(runs, s)
    assert s["bytes_per_kept_doc"] <= 300, (runs, s)
