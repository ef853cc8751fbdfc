"""Fault injection for the data pipeline (issue 12): an unreadable input record costs only itself (and with
--strict stops the run with an error naming the file, the line and the fix); a failed, interrupted or killed
--force rebuild leaves the finished data as it was; a damaged shard is an error naming it and the fix; and the
data CLI answers bad input with one line, never a traceback."""
from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import shutil
import signal
import subprocess
import sys

import pytest
from data_testing import SMALL, doc

from gpt2fast.data import (
    DataError,
    PrepareOptions,
    ShardError,
    TokenLoader,
    main,
    pipeline,
    prepare,
    read_manifest,
    shards,
    unigram_entropy,
    work,
)
from gpt2fast.data.shards import rebuild_dir

pytest_plugins = ["data_testing"]

quiet = dict(log=lambda s: None)


def _snapshot(folder) -> dict:
    """Every file in ``folder`` and its sha256: what "left as it was" means."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _shard_bytes(folder) -> dict:
    manifest = read_manifest(folder)
    return {split: [(folder / s["file"]).read_bytes() for s in sp["shards"]]
            for split, sp in manifest["splits"].items()}


# ------------------------------------------------------------------------------------------ bad input (item 7)
@pytest.fixture(scope="module")
def damaged_inputs(tmp_path_factory):
    """Good documents with one unreadable record of each kind among them, and the same inputs holding only
    what can be read (what the damaged ones must prepare to, byte for byte)."""
    rng = random.Random(99)
    docs = [doc(rng) for _ in range(12)]
    root = tmp_path_factory.mktemp("damaged")
    line = lambda text, **extra: json.dumps({"text": text, **extra}).encode() + b"\n"
    web = root / "web.jsonl"
    web.write_bytes(b"\xef\xbb\xbf" + line(docs[0])                 # 1: a byte-order mark: accepted
                    + b'{"text": "cut off\n'                        # 2: not JSON
                    + line(docs[1])                                  # 3
                    + b'{"url": "https://example.com/no-text"}\n'   # 4: no text
                    + line(docs[2])                                  # 5
                    + b'{"text": 5}\n'                              # 6: text not a string
                    + line(docs[3])                                  # 7
                    + b'{"text": "caf\xe9 au lait"}\n'              # 8: not UTF-8
                    + line(docs[4], score="lots")                    # 9: a bad score
                    + b"\n"                                          # 10: empty lines are not records
                    + line(docs[5]))                                 # 11
    z = gzip.compress(b"".join(line(d) for d in docs[6:12]))
    cut = root / "cut.jsonl.gz"
    cut.write_bytes(z[:len(z) * 6 // 10])  # an interrupted download
    with gzip.open(cut, "rt", encoding="utf-8") as f:
        survivors = []
        with pytest.raises(EOFError):
            for text_line in f:
                survivors.append(text_line)
    survivors = [json.loads(s)["text"] for s in survivors if s.endswith("\n")]
    assert 0 < len(survivors) < 6
    fake = root / "fake.jsonl.gz"
    fake.write_bytes(line(docs[0]))  # named .gz, not compressed
    latin = root / "latin.txt"
    latin.write_bytes(docs[11].replace("a", "\u00e4").encode("latin-1"))

    clean = tmp_path_factory.mktemp("clean")
    (clean / "web.jsonl").write_bytes(b"".join(line(docs[i]) for i in (0, 1, 2, 3, 5)))
    with gzip.open(clean / "cut.jsonl.gz", "wb") as f:
        f.write(b"".join(line(t) for t in survivors))
    return {"damaged": [web, cut, fake, latin], "clean": [clean / "web.jsonl", clean / "cut.jsonl.gz"],
            "survivors": len(survivors)}


def test_unreadable_records_cost_only_themselves(damaged_inputs, tmp_path, capsys):
    manifest = prepare(damaged_inputs["damaged"], tmp_path / "out", PrepareOptions(**SMALL), **quiet)
    err = capsys.readouterr().err
    reference = prepare(damaged_inputs["clean"], tmp_path / "ref", PrepareOptions(**SMALL), **quiet)
    assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "ref")  # the same data, byte for byte

    web, cut, fake, latin = (str(p) for p in damaged_inputs["damaged"])
    expected = {"invalid_json": 1, "no_text": 2, "undecodable": 2, "bad_field": 1, "damaged_gzip": 2}
    first, ref_first = manifest["stages"][0], reference["stages"][0]
    assert first["name"] == "input" and first["dropped_by"] == expected
    assert first["docs_in"] == ref_first["docs_in"] + 8 and first["docs_out"] == ref_first["docs_out"]
    assert manifest["stages"][1:] == reference["stages"][1:]  # past the input, nothing differs
    resolved = lambda p: str(damaged_inputs["damaged"][[web, cut, fake, latin].index(p)].resolve())
    assert manifest["unreadable"] == {
        "records": 8, "by_reason": dict(sorted(expected.items())),
        "files": [
            {"path": resolved(web), "records": 5, "lines": [2, 4, 6, 8, 9],
             "by_reason": {"bad_field": 1, "invalid_json": 1, "no_text": 2, "undecodable": 1}},
            {"path": resolved(cut), "records": 1, "lines": [], "by_reason": {"damaged_gzip": 1},
             "rest_lost_after_line": damaged_inputs["survivors"]},
            {"path": resolved(fake), "records": 1, "lines": [], "by_reason": {"damaged_gzip": 1},
             "rest_lost_after_line": 0},
            {"path": resolved(latin), "records": 1, "lines": [], "by_reason": {"undecodable": 1}},
        ]}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest

    warnings = err.splitlines()
    for where in (f"{web}:2: not valid JSON", f"{web}:4: expected an object", f"{web}:6: expected an object",
                  f"{web}:8: byte 0xe9 at byte 14", f"{web}:9: \"score\" must be a number",
                  f"{cut}:{damaged_inputs['survivors'] + 1}: damaged gzip", f"{fake}:1: damaged gzip",
                  f"{latin}: byte 0xe4"):
        assert sum(w.startswith(f"warning: {where}") and w.endswith("skipped") for w in warnings) == 1, where
    assert warnings[-1].startswith("warning: skipped 8 unreadable input record(s) in 4 file(s) (bad_field 1, "
                                   "damaged_gzip 2, invalid_json 1, no_text 2, undecodable 2)")
    table = pipeline.funnel_table(manifest)
    assert "unreadable records skipped: 8" in table
    assert f"  {resolved(web)}: bad_field 1, invalid_json 1, no_text 2, undecodable 1 (line 2, 4, 6, 8, 9)" in table
    assert f"the rest of the file after line {damaged_inputs['survivors']} is lost" in table


@pytest.mark.parametrize("which, where, fix", [
    (0, "web.jsonl:2: not valid JSON", "fix or remove that line"),
    (1, "cut.jsonl.gz:", "download or compress the file again"),
    (2, "fake.jsonl.gz:1: damaged gzip (Not a gzipped file", "download or compress the file again"),
    (3, "latin.txt: byte 0xe4 at line 1", "convert the file to UTF-8"),
])
def test_strict_stops_at_the_first_with_the_file_the_line_and_the_fix(damaged_inputs, tmp_path, capsys, which,
                                                                       where, fix):
    path = damaged_inputs["damaged"][which]
    out = tmp_path / "out"
    with pytest.raises(DataError, match=rf"{re.escape(where)}.*; {fix}.*, or run without --strict"):
        prepare([path], out, PrepareOptions(**SMALL, strict=True), **quiet)
    assert not (out / "manifest.json").exists()
    assert main(["prepare", str(path), "--out", str(out), "--strict", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path.parent / where}") and err.count("\n") == 1 and "Traceback" not in err


def test_strict_accepts_a_byte_order_mark_and_refuses_a_folder_that_skipped(damaged_inputs, tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(damaged_inputs["damaged"][0].read_bytes().split(b"\n")[0] + b"\n")
    manifest = prepare([bom], tmp_path / "bom", PrepareOptions(strict=True), **quiet)
    assert manifest["stages"][-1]["docs_out"] == 1 and manifest["unreadable"]["records"] == 0
    out = tmp_path / "out"
    prepare(damaged_inputs["damaged"], out, PrepareOptions(**SMALL), **quiet)
    with pytest.raises(DataError, match=r"by skipping 8 unreadable record\(s\) \(the first at .*web.jsonl:2\), "
                                        r"which --strict refuses"):
        prepare(damaged_inputs["damaged"], out, PrepareOptions(**SMALL, strict=True), **quiet)


def test_warnings_are_capped_and_the_manifest_stays_small(tmp_path, capsys):
    path = tmp_path / "many.jsonl"
    path.write_text('{"no": "text"}\n' * 150 + json.dumps({"text": doc(random.Random(1))}) + "\n", encoding="utf-8")
    manifest = prepare([path], tmp_path / "out", **quiet)
    err = capsys.readouterr().err.splitlines()
    assert sum(w.endswith("; skipped") for w in err) == 20
    assert sum("more unreadable records than 20" in w for w in err) == 1
    (entry,) = manifest["unreadable"]["files"]
    assert entry["records"] == 150 and entry["lines"] == list(range(1, 101))
    assert manifest["stages"][-1]["docs_out"] == 1


# ------------------------------------------------------------------------------------------ --force (item 8)
NEW = dict(SMALL, min_chars=10)  # "Too short to keep." passes: other data


@pytest.fixture
def finished(corpus, tmp_path):
    """A finished folder prepared with SMALL, holding a file of the user's too."""
    out = tmp_path / "out"
    prepare(corpus["inputs"], out, PrepareOptions(**SMALL), **quiet)
    (out / "NOTES.txt").write_text("mine", encoding="utf-8")
    return out


@pytest.mark.parametrize("error", [RuntimeError("a bug"), OSError(28, "No space left on device"),
                                   KeyboardInterrupt()])
def test_a_failed_force_rebuild_leaves_the_data_as_it_was(corpus, finished, monkeypatch, error):
    before = _snapshot(finished)
    finish, calls = shards.ShardWriter._finish, []

    def fail_on_the_second_shard(self):
        calls.append(1)
        if len(calls) == 2:
            raise error
        finish(self)

    monkeypatch.setattr(shards.ShardWriter, "_finish", fail_on_the_second_shard)
    with pytest.raises(type(error)):
        prepare(corpus["inputs"], finished, PrepareOptions(**NEW), force=True, **quiet)
    monkeypatch.undo()
    assert _snapshot(finished) == before and not rebuild_dir(finished).exists()
    TokenLoader(finished, "train", 2, 8, verify=True)
    said = []
    prepare(corpus["inputs"], finished, PrepareOptions(**SMALL), log=said.append)
    assert "nothing to do" in said[0]


def test_ctrl_c_during_a_force_rebuild_says_the_data_is_kept(corpus, finished, monkeypatch, capsys):
    before = _snapshot(finished)
    monkeypatch.setattr(work, "as_uint16", lambda ids, tokenizer: (_ for _ in ()).throw(KeyboardInterrupt()))
    argv = ["prepare", *map(str, corpus["inputs"]), "--out", str(finished), "--min-chars", "10", "--force",
            "--no-progress"]
    assert main(argv) == 130
    assert capsys.readouterr().err == (f"interrupted: {finished} still holds the data it held before; run the same "
                                       f"command again to rebuild it\n")
    assert _snapshot(finished) == before and not rebuild_dir(finished).exists()


def test_a_force_rebuild_replaces_the_data_and_keeps_other_files(corpus, finished, tmp_path):
    old = read_manifest(finished)
    new = dict(NEW, shard_tokens=4000)  # fewer shards than before: the extra old ones must go
    manifest = prepare(corpus["inputs"], finished, PrepareOptions(**new), force=True, **quiet)
    fresh = prepare(corpus["inputs"], tmp_path / "fresh", PrepareOptions(**new), **quiet)
    assert _shard_bytes(finished) == _shard_bytes(tmp_path / "fresh")
    assert manifest["fingerprint"] == fresh["fingerprint"] != old["fingerprint"]
    shard_files = {s["file"] for sp in manifest["splits"].values() for s in sp["shards"]}
    assert {p.name for p in finished.iterdir()} == shard_files | {"manifest.json", "funnel.png", "NOTES.txt"}
    assert len(shard_files) < sum(len(sp["shards"]) for sp in old["splits"].values())
    assert not rebuild_dir(finished).exists()


_KILL = r"""
import json, os, signal, sys
from gpt2fast.data import PrepareOptions, prepare, shards

inputs, out, options, phase = sys.argv[1:5]
calls = []

def die_on_the_second(call):
    def wrapped(*args):
        result = call(*args)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped

if phase == "building":
    shards.ShardWriter._finish = die_on_the_second(shards.ShardWriter._finish)
else:  # while the rebuilt files are being moved in
    replace = os.replace
    moving = die_on_the_second(replace)
    os.replace = lambda src, dst: (moving if ".rebuild" in str(src) and ".rebuild" not in str(dst) else replace)(
        src, dst)
prepare(json.loads(inputs), out, PrepareOptions(**json.loads(options)), force=True, log=lambda s: None)
"""


@pytest.mark.parametrize("phase", ["building", "moving in"])
def test_a_killed_force_rebuild_is_settled_by_the_next_run(corpus, finished, tmp_path, phase):
    from conftest import REPO

    before = _snapshot(finished)
    done = subprocess.run([sys.executable, "-c", _KILL, json.dumps([str(p) for p in corpus["inputs"]]),
                           str(finished), json.dumps(NEW), phase], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert rebuild_dir(finished).is_dir()  # what kill -9 leaves beside the data
    said = []
    if phase == "building":
        assert _snapshot(finished) == before  # untouched: the old data reads as before
        TokenLoader(finished, "train", 2, 8, verify=True)
        prepare(corpus["inputs"], finished, PrepareOptions(**SMALL), log=said.append)
        assert "left by an interrupted --force rebuild" in said[0] and "nothing to do" in said[1]
        assert _snapshot(finished) == before
    else:
        assert not (finished / "manifest.json").exists()
        with pytest.raises(DataError, match="interrupted while it was being moved in: run the same prepare command"):
            TokenLoader(finished, "train", 2, 8)
        prepare(corpus["inputs"], finished, PrepareOptions(**NEW), log=said.append)
        assert "finishing the --force rebuild" in said[0] and "nothing to do" in said[1]
        fresh = tmp_path / "fresh"
        prepare(corpus["inputs"], fresh, PrepareOptions(**NEW), **quiet)
        assert _shard_bytes(finished) == _shard_bytes(fresh)
        TokenLoader(finished, "train", 2, 8, verify=True)
        assert (finished / "NOTES.txt").read_text(encoding="utf-8") == "mine"
    assert not rebuild_dir(finished).exists()


def test_an_interrupted_plain_run_still_resumes_in_place(corpus, tmp_path, monkeypatch):
    """Without a finished folder there is nothing to keep: the run builds in place, and the next one removes
    what it left and rebuilds, to the same bytes."""
    out = tmp_path / "out"
    monkeypatch.setattr(work, "as_uint16", lambda ids, tokenizer: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus["inputs"], out, PrepareOptions(**SMALL), force=True, **quiet)
    monkeypatch.undo()
    assert not rebuild_dir(out).exists() and not (out / "manifest.json").exists()
    prepare(corpus["inputs"], out, PrepareOptions(**SMALL), **quiet)
    prepare(corpus["inputs"], tmp_path / "fresh", PrepareOptions(**SMALL), **quiet)
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "fresh")


# ------------------------------------------------------------------------------------------ damaged shards (item 6)
def _flip(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 0x10]) + raw[at + 1:]


@pytest.mark.parametrize("damage, always", [
    (lambda raw: raw[:-7], True),             # truncated
    (lambda raw: raw + b"\0" * 4, True),      # the wrong size
    (lambda raw: _flip(raw, 100), True),      # a flipped bit in the header's padding
    (lambda raw: _flip(raw, 600), False),     # a flipped bit in a token: only the sha256 sees it
], ids=["truncated", "wrong size", "header bit", "token bit"])
def test_a_damaged_shard_is_named_with_the_fix(corpus, prepared, tmp_path, capsys, damage, always):
    out = tmp_path / "copy"
    shutil.copytree(prepared[0], out)
    shard = out / "train_000001.bin"
    shard.write_bytes(damage(shard.read_bytes()))
    checks = [lambda: TokenLoader(out, "train", 2, 8, verify=True), lambda: unigram_entropy(out, "train")]
    if always:
        checks.append(lambda: TokenLoader(out, "train", 2, 8))
    else:
        TokenLoader(out, "train", 2, 8)  # by default the header and the size only: a whole read is not cheap
    for check in checks:
        with pytest.raises(ShardError, match=r"train_000001.bin .*prepare the data again \(with --force\)"):
            check()
    for command in ("verify", "info"):
        assert main([command, str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: shard ") and "train_000001.bin" in err and err.count("\n") == 1
    if always:  # a re-run finds it too (its cheap checks: headers and sizes), and says what to do
        with pytest.raises(DataError, match=r"damaged \(shard .*train_000001.bin.*pass --force to rebuild it"):
            prepare(corpus["inputs"], out, PrepareOptions(**SMALL), **quiet)
    prepare(corpus["inputs"], out, PrepareOptions(**SMALL), force=True, **quiet)  # the fix the errors give
    assert main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")


# ------------------------------------------------------------------------------------------ the CLI (item 11)
def _edit_manifest(folder, edit) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("setup, command, words", [
    (lambda d: _edit_manifest(d, lambda m: m.pop("splits")), "info", 'manifest.json is damaged or from another '
                                                                     'version of gpt2fast: it has no "splits"'),
    (lambda d: _edit_manifest(d, lambda m: m.update(shard_version=2)), "info", "shards are of format version 2"),
    (lambda d: _edit_manifest(d, lambda m: m.update(format="other")), "info", "not a gpt2fast data manifest"),
    (lambda d: _edit_manifest(d, lambda m: m["splits"]["train"]["shards"][0].update(file="../../etc/passwd")),
     "verify", 'shards[0] has no valid "file"'),
    (lambda d: _edit_manifest(d, lambda m: m["splits"]["val"]["shards"][0].pop("sha256")), "verify",
     'has no valid "sha256"'),
    (lambda d: _edit_manifest(d, lambda m: m["stages"][0].pop("docs_in")), "info", '"stages"[0] must be'),
    (lambda d: _edit_manifest(d, lambda m: m["tokenizer"].pop("vocab_size")), "verify", '"tokenizer" must be'),
    (lambda d: (d / "manifest.json").write_text("[1, 2"), "info", "manifest.json is not valid JSON"),
    (lambda d: (d / "manifest.json").write_bytes(b"\xff\xfe"), "info", "manifest.json is not valid JSON"),
    (lambda d: (d / "manifest.json").write_text("[1, 2]"), "verify", "not a gpt2fast data manifest"),
    (lambda d: (d / "manifest.json").unlink(), "verify", "no manifest.json in"),
], ids=["no splits", "shard version", "other format", "shard path", "no sha256", "stage", "tokenizer",
        "torn JSON", "not UTF-8", "not an object", "no manifest"])
def test_a_bad_manifest_is_one_line_naming_it(prepared, tmp_path, capsys, setup, command, words):
    out = tmp_path / "copy"
    shutil.copytree(prepared[0], out)
    setup(out)
    assert main([command, str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err and str(out) in err
    with pytest.raises(DataError):
        TokenLoader(out, "train", 2, 8)


def test_bad_paths_are_one_line(corpus, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x", encoding="utf-8")
    empty = tmp_path / "empty"
    empty.mkdir()
    inputs = [str(p) for p in corpus["inputs"]]
    cases = [
        (["prepare", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")], "no such file or folder"),
        (["prepare", *inputs, "--out", str(a_file)], "is a file; give a folder"),
        (["prepare", *inputs, "--out", str(a_file / "below")], f"cannot be created: {a_file} is a file"),
        (["prepare", str(empty), "--out", str(tmp_path / "o")], "no input files found"),
        (["prepare", str(tmp_path), "--out", str(tmp_path / "o")], "inside the input folder"),
        (["prepare", *inputs, "--out", ""], "--out is empty"),
        (["info", str(a_file)], "is a file, not a prepared data folder"),
        (["info", str(tmp_path / "nowhere")], "no manifest.json in"),
        (["verify", str(tmp_path / "nowhere")], "no manifest.json in"),
    ]
    for argv, words in cases:
        assert main(argv + (["--no-progress"] if argv[0] == "prepare" else [])) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, (argv, err)

