"""Several processes on the CPU (gloo): DDP and FSDP training give the losses and weights of one process with
the same global batch."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from gpt2fast.train import Trainer
from test_train import metrics, quick

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
