"""gpt2fast.data.shards: the shard file format, the refusal of ids beyond uint16, and the checks a reader makes."""
from __future__ import annotations

import hashlib
import shutil
import struct

import numpy as np
import pytest

from gpt2fast import data
from gpt2fast.data import DataError, ShardDataset, ShardError, TokenLoader, prepare, read_shard

pytest_plugins = ["data_testing"]


def test_shard_files_have_the_header(prepared):
    out, manifest = prepared
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) >= 2 and all(s["tokens"] == 1000 for s in shards[:-1])
    assert [s["file"] for s in shards] == [f"train_{i:06d}.bin" for i in range(len(shards))]
    for s in shards + manifest["splits"]["val"]["shards"]:
        raw = (out / s["file"]).read_bytes()
        magic, version, count = struct.unpack_from("<iiq", raw)
        assert raw[:4] == b"G2FS" and magic == data.SHARD_MAGIC and version == 1 and count == s["tokens"]
        assert raw[16:256] == bytes(240)
        assert len(raw) == 256 + 2 * count == s["bytes"]
        assert hashlib.sha256(raw).hexdigest() == s["sha256"]
        assert np.array_equal(read_shard(out / s["file"]), np.frombuffer(raw[256:], "<u2"))


class _BigTokenizer:
    name, eot_token = "big", 3

    def __init__(self, n_vocab, ids):
        self.n_vocab, self._ids = n_vocab, ids

    def encode_ordinary_batch(self, texts, num_threads=None):
        return [list(self._ids) for _ in texts]


def test_ids_that_do_not_fit_uint16_are_refused(corpus, tmp_path):
    with pytest.raises(DataError, match="100000 tokens.*uint16"):
        prepare(corpus["inputs"], tmp_path / "a", tokenizer=_BigTokenizer(100_000, [1]), log=lambda s: None)
    with pytest.raises(DataError, match="token id 70000 .* does not fit in a uint16"):
        prepare(corpus["inputs"], tmp_path / "b", tokenizer=_BigTokenizer(50_000, [1, 70000]), log=lambda s: None)
    assert not (tmp_path / "b" / "manifest.json").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda raw: b"XXXX" + raw[4:], "not a gpt2fast token shard: magic"),
    (lambda raw: raw[:-10], "truncated: its header says 1000 tokens"),
    (lambda raw: raw[:100], "truncated: 100 bytes, shorter than the 256-byte header"),
    (lambda raw: raw[:4] + struct.pack("<i", 9) + raw[8:], "format version 9"),
    (lambda raw: raw + b"\0\0", "corrupt: its header says 1000 tokens"),
    (lambda raw: raw[:100] + b"\1" + raw[101:], "damaged header: bytes 16-255 must be zero"),
])
def test_corrupt_shards_are_named(prepared, tmp_path, damage, message):
    out = tmp_path / "copy"
    shutil.copytree(prepared[0], out)
    shard = out / "train_000001.bin"
    shard.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(ShardError, match=message) as e:
        TokenLoader(out, "train", 2, 8)
    assert "train_000001.bin" in str(e.value)
    shard.unlink()
    with pytest.raises(ShardError, match="train_000001.bin is missing"):
        ShardDataset(out, "train")


def test_verify_checks_the_sha256(prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared[0], out)
    shard = out / "val_000000.bin"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    ShardDataset(out, "val")  # sizes still agree
    with pytest.raises(ShardError, match="val_000000.bin has sha256"):
        ShardDataset(out, "val", verify=True)
    with pytest.raises(ShardError, match="val_000000.bin has sha256"):
        TokenLoader(out, "val", 1, 8, verify=True)
    with pytest.raises(ShardError, match="val_000000.bin has sha256"):
        list(ShardDataset(out, "val").chunks())  # read whole anyway: checked on the way


def test_chunks_give_every_token_and_check_each_shard(prepared):
    out, manifest = prepared
    ds = ShardDataset(out, "train")
    assert ds.verify() == sum(s["bytes"] for s in manifest["splits"]["train"]["shards"])
    assert np.array_equal(np.concatenate(list(ds.chunks(size=333))), ds.read(0, ds.num_tokens))
