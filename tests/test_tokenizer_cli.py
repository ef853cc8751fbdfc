"""`python -m gpt2fast.tokenizer`: encode, decode, train, bench."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from gpt2fast import Tokenizer
from gpt2fast.tokenizer_cli import main


def run_module(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "gpt2fast.tokenizer", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_encode_and_decode_from_the_command_line():
    out = run_module("encode", "Hello world")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["15496", "995"]
    back = run_module("decode", "15496", "995")
    assert back.returncode == 0 and back.stdout == "Hello world\n"
    piped = run_module("encode", "--count", stdin="Hello world")
    assert piped.stdout.strip() == "2"


def test_special_tokens_need_the_flag(capsys):
    assert main(["encode", "a<|endoftext|>"]) == 2
    assert "special token '<|endoftext|>' at character 1" in capsys.readouterr().err
    assert main(["encode", "--allow-special", "a<|endoftext|>"]) == 0
    assert capsys.readouterr().out.split() == ["64", "50256"]


def test_decode_rejects_bad_ids(capsys):
    assert main(["decode", "1", "99999"]) == 2
    assert "99999" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="must be integers"):
        main(["decode", "1", "x"])


def test_train_writes_a_loadable_vocabulary(tmp_path, small_documents, capsys):
    data = tmp_path / "docs.jsonl.gz"
    with gzip.open(data, "wt", encoding="utf-8") as f:
        for doc in small_documents[:30]:
            f.write(json.dumps({"text": doc}) + "\n")
    (tmp_path / "plain.txt").write_text(small_documents[40], encoding="utf-8")
    out_dir = tmp_path / "vocab"
    assert main(["train", str(data), str(tmp_path / "plain.txt"), "--vocab-size", "700", "--out", str(out_dir)]) == 0
    assert "trained 700 tokens on 31 documents" in capsys.readouterr().out
    tok = Tokenizer.from_files(out_dir / "encoder.json", out_dir / "vocab.bpe")
    assert tok.n_vocab == 700 and tok.decode(tok.encode(small_documents[5])) == small_documents[5]
    assert main(["encode", "--vocab", str(out_dir), "the whale"]) == 0
    assert capsys.readouterr().out.split() == [str(i) for i in tok.encode("the whale")]


def test_train_rejects_a_too_small_vocabulary(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("some text", encoding="utf-8")
    assert main(["train", str(tmp_path / "t.txt"), "--vocab-size", "10", "--out", str(tmp_path / "v")]) == 2
    assert "vocab_size=10 is too small" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_bench_reports_throughput(tmp_path, small_documents, capsys):
    (tmp_path / "t.txt").write_text(small_documents[0], encoding="utf-8")
    assert main(["bench", str(tmp_path / "t.txt"), "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "gpt2fast encode_ordinary (1 thread)" in out and "MB/s" in out


def test_bad_file_and_out_arguments_are_clear_errors_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"--file .* is a folder"):
        main(["encode", "--file", str(tmp_path)])
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes(b"caf\xe9")
    with pytest.raises(SystemExit, match=r"--file .*latin1.txt is not UTF-8 text \(byte 3"):
        main(["encode", "--file", str(not_utf8)])
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    docs = tmp_path / "docs.txt"
    docs.write_text("some text to train on " * 50)
    with pytest.raises(SystemExit, match=r"--out .*taken is a file"):
        main(["train", str(docs), "--vocab-size", "300", "--out", str(a_file)])


@pytest.mark.parametrize("argv", [["bench", "--repeat", "0"], ["bench", "--threads", "0"],
                                  ["train", "x", "--vocab-size", "300", "--out", "o", "--threads", "0"]])
def test_counts_below_one_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "must be an integer >= 1" in capsys.readouterr().err
