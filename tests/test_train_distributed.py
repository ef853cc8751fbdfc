"""Several processes on the CPU (gloo): DDP and FSDP training give the losses and weights of one process with
the same global batch."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_train import metrics, quick

from gpt2fast.train import Trainer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        Trainer(cfg, log=lambda s: None).run()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, small_shards, fsdp):
    torch.set_num_threads(1)
    single = quick(tmp_path / "one", small_shards, batch_size=4, max_steps=4, eval_interval=2)
    Trainer(single, log=lambda s: None).run()
    expected = metrics(tmp_path / "one" / "out")

    double = quick(tmp_path / "two", small_shards, batch_size=2, max_steps=4, eval_interval=2, fsdp=fsdp)
    mp.spawn(_worker, args=(2, _free_port(), double), nprocs=2, join=True)
    got = metrics(tmp_path / "two" / "out")
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5, abs=1e-6), step
    assert got[4]["val_loss"] == pytest.approx(expected[4]["val_loss"], rel=1e-5)
    from gpt2fast.model import GPT2

    one = GPT2.from_pretrained(tmp_path / "one" / "out" / "ckpt_0000004", backend="torch")
    two = GPT2.from_pretrained(tmp_path / "two" / "out" / "ckpt_0000004", backend="torch")
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5, msg=name)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_resume_exactly(tmp_path, small_shards, fsdp):
    """A two-process run stopped after step 3's checkpoint and resumed (--resume, each process reloading the
    full checkpoint; FSDP re-shards it) gives the losses of the uninterrupted two-process run."""
    import shutil

    torch.set_num_threads(1)
    settings = dict(batch_size=2, max_steps=6, eval_interval=3, checkpoint_interval=3, fsdp=fsdp)
    whole = quick(tmp_path / "whole", small_shards, **settings)
    mp.spawn(_worker, args=(2, _free_port(), whole), nprocs=2, join=True)
    expected = metrics(tmp_path / "whole" / "out")

    part = quick(tmp_path / "part", small_shards, **settings)
    mp.spawn(_worker, args=(2, _free_port(), part), nprocs=2, join=True)
    shutil.rmtree(tmp_path / "part" / "out" / "ckpt_0000006")  # as if both processes had died after step 3
    (tmp_path / "part" / "out" / "metrics.jsonl").unlink()
    resumed = quick(tmp_path / "part", small_shards, resume=True, **settings)
    mp.spawn(_worker, args=(2, _free_port(), resumed), nprocs=2, join=True)
    got = metrics(tmp_path / "part" / "out")
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step]["loss"] == expected[step]["loss"], step
    assert got[6]["val_loss"] == expected[6]["val_loss"]
