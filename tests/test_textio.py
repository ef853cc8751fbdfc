"""gpt2fast.textio: the readers behind the command lines, and what they make of input they cannot read."""
from __future__ import annotations

import gzip
import json

import pytest

from gpt2fast.errors import DataError
from gpt2fast.textio import (
    BAD_FIELD,
    DAMAGED_GZIP,
    INVALID_JSON,
    NO_TEXT,
    UNDECODABLE,
    default_corpus_path,
    iter_documents,
    iter_records,
)


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
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object with a string \"text\" field, got "
                                        r"\"text\" is a number; give each line"):
        list(iter_documents([bad]))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"\n', encoding="utf-8")
    with pytest.raises(ValueError, match="broken.jsonl:1: not valid JSON"):  # DataError is a ValueError
        list(iter_documents([broken]))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        list(iter_documents([tmp_path / "missing.txt"]))
    with pytest.raises(DataError, match="no such file or folder: .*missing.txt"):  # both, for the CLIs
        list(iter_documents([tmp_path / "missing.txt"]))


_GOOD = '{"text": "good"}\n'
# (what the file holds, the reason, words of the message): each a single bad line between two good ones
_BAD_LINES = [
    (b'{"text": "cut off\n', INVALID_JSON, "not valid JSON (Unterminated string"),
    (b'{"text": "x"} trailing\n', INVALID_JSON, "not valid JSON (Extra data"),
    (b"[" * 100_000 + b"\n", INVALID_JSON, "not valid JSON"),  # nesting beyond the recursion limit
    (b'{"text": "x", "n": ' + b"9" * 5000 + b"}\n", INVALID_JSON, "not valid JSON"),  # past int's digit limit
    (b'{"url": "https://example.com"}\n', NO_TEXT, 'got no "text" field'),
    (b'{"text": null}\n', NO_TEXT, '"text" is null'),
    (b'{"text": ["a", "b"]}\n', NO_TEXT, '"text" is an array'),
    (b'"just a string"\n', NO_TEXT, "got a JSON str"),
    (b'{"text": "x", "score": "lots"}\n', BAD_FIELD, '"score" must be a number'),
    (b'{"text": "x", "score": NaN}\n', BAD_FIELD, '"score" is NaN'),
    (b'{"text": "x", "score": ' + b"1" * 400 + b"}\n", BAD_FIELD, "beyond a float's range"),
    (b'{"text": "x", "url": 7}\n', BAD_FIELD, '"url" must be a string'),
    (b'{"text": "caf\xe9"}\n', UNDECODABLE, "byte 0xe9 at byte 14 of the line is not UTF-8"),
    (b'{"text": "\xed\xa0\x80"}\n', UNDECODABLE, "byte 0xed at byte 11"),  # an encoded surrogate
]


@pytest.mark.parametrize("line, reason, words", _BAD_LINES, ids=[f"{r}-{i}" for i, (_, r, _) in enumerate(_BAD_LINES)])
def test_each_bad_line_costs_only_itself(tmp_path, line, reason, words):
    path = tmp_path / "in.jsonl"
    path.write_bytes(_GOOD.encode() + line + _GOOD.encode())
    bad = []
    assert list(iter_documents([path], on_bad=bad.append)) == ["good", "good"]
    (b,) = bad
    assert (b.path, b.line, b.reason, b.rest_lost) == (path, 2, reason, False)
    assert words in b.detail and str(b).startswith(f"{path}:2: ")
    assert b.nbytes == len(line)
    with pytest.raises(DataError, match=f"in.jsonl:2: .*; {b.fix[:20]}"):  # no on_bad: the first is an error
        list(iter_documents([path]))


def test_a_byte_order_mark_is_accepted(tmp_path):
    jsonl, plain = tmp_path / "bom.jsonl", tmp_path / "bom.txt"
    jsonl.write_bytes(b"\xef\xbb\xbf" + _GOOD.encode() + b"\xef\xbb\xbf" + _GOOD.encode())  # two files concatenated
    plain.write_bytes(b"\xef\xbb\xbfplain")
    with gzip.open(tmp_path / "bom.jsonl.gz", "wb") as f:
        f.write(b"\xef\xbb\xbf" + _GOOD.encode())
    assert list(iter_documents([tmp_path])) == ["good", "good", "good", "plain"]


def test_undecodable_plain_file_is_one_bad_record(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\nna\u00efve".encode("latin-1"))
    bad = []
    assert list(iter_documents([path], on_bad=bad.append)) == []
    assert bad[0].line is None and bad[0].reason == UNDECODABLE
    assert "byte 0xef at line 2, byte 3 of the line is not UTF-8; the whole file is skipped" in bad[0].detail
    with pytest.raises(DataError, match="latin1.txt: byte 0xef.*convert the file to UTF-8"):
        list(iter_documents([path]))


def _gzip_lines(n: int) -> bytes:
    return gzip.compress("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(n)).encode())


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "not gzip", "bad checksum"])
def test_a_damaged_gzip_keeps_what_was_read_and_says_how_far(tmp_path, damage):
    z = bytearray(_gzip_lines(5000))
    if damage == "truncated":
        z = z[:len(z) // 2]
    elif damage == "corrupt":
        z[len(z) // 2:len(z) // 2 + 64] = bytes(64)
    elif damage == "not gzip":
        z = bytearray(b'{"text": "not compressed"}\n')
    else:
        z[-8] ^= 0xFF  # the CRC-32 of the trailer: every record reads, the check at the end fails
    path = tmp_path / "damaged.jsonl.gz"
    path.write_bytes(bytes(z))
    after = tmp_path / "z_after.jsonl"
    after.write_text(_GOOD, encoding="utf-8")
    bad = []
    records = list(iter_records([path, after], on_bad=bad.append))
    assert records[-1].text == "good"  # the next file is read as usual
    b = bad[-1]
    assert b.reason == DAMAGED_GZIP and b.rest_lost and b.path == path
    read = b.line - 1
    assert all(x.reason == INVALID_JSON for x in bad[:-1])  # damaged text that no longer parses
    expected = [f"record {i}" for i in range(read)]
    if damage != "corrupt":  # a prefix, in order (corrupt data may have garbled some of it)
        assert [r.text for r in records[:-1]] == expected
        assert len(bad) == 1
    assert (read == 0) == (damage == "not gzip") and (read == 5000) == (damage == "bad checksum")
    said = {"truncated": f"(Compressed file ended before the end-of-stream marker was reached): lines 1-{read} "
                         f"were read, the rest of the file is lost",
            "corrupt": f"lines 1-{read} were read, the rest of the file is lost",
            "not gzip": "(Not a gzipped file (b'{\"')): nothing could be read from it",
            "bad checksum": "(CRC check failed"}[damage]
    assert ("may hold damaged text" in str(b)) == (damage == "bad checksum")
    assert said in str(b)
    first = bad[0]
    with pytest.raises(DataError, match=rf"damaged.jsonl.gz:{first.line}: .*{first.fix[:20]}"):
        list(iter_records([path]))


def test_a_damaged_gzip_plain_file_is_lost_whole(tmp_path):
    path = tmp_path / "doc.txt.gz"
    z = gzip.compress(" ".join(f"word{i}" for i in range(10_000)).encode())
    path.write_bytes(z[:len(z) // 2])
    bad = []
    assert list(iter_documents([path], on_bad=bad.append)) == []
    assert bad[0].reason == DAMAGED_GZIP and bad[0].line is None and "the whole file is lost" in bad[0].detail


def test_the_shipped_corpus_is_there():
    docs = list(iter_documents([default_corpus_path()]))
    assert len(docs) == 135 and "Call me Ishmael" in docs[0]
