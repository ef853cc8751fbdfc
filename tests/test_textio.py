"""gpt2fast.textio: the readers behind the command lines."""
from __future__ import annotations

import gzip

import pytest

from gpt2fast.textio import default_corpus_path, iter_documents


def test_reads_plain_jsonl_gzip_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("plain file", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "url": "x"}\n', encoding="utf-8")
    with gzip.open(tmp_path / "sub" / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("zipped")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    assert list(iter_documents([tmp_path])) == ["plain file", "one", "two", "zipped"]


def test_bad_records_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a string \"text\" field"):
        list(iter_documents([bad]))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"\n', encoding="utf-8")
    with pytest.raises(ValueError, match="broken.jsonl:1: not valid JSON"):
        list(iter_documents([broken]))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        list(iter_documents([tmp_path / "missing.txt"]))


def test_the_shipped_corpus_is_there():
    docs = list(iter_documents([default_corpus_path()]))
    assert len(docs) == 135 and "Call me Ishmael" in docs[0]
