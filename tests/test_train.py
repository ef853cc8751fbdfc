"""gpt2fast.train: configuration, schedule, the training loop, checkpoints and exact resume (CPU)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from gpt2fast import data, train
from gpt2fast.compute import model_flops_per_token
from gpt2fast.errors import ConfigError
from gpt2fast.train import TrainConfig, Trainer, flag, help_text, learning_rate, main, parse_args


def quick(tmp_path, shards, **overrides) -> TrainConfig:
    settings = dict(data=str(shards), out_dir=str(tmp_path / "out"), block_size=32, batch_size=2, max_steps=6,
                    max_minutes=0, eval_interval=3, eval_batches=2, checkpoint_interval=3, keep_checkpoints=5,
                    warmup_steps=2, lr=3e-3, min_lr=3e-4, device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)


def metrics(out_dir) -> dict:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


# -------------------------------------------------------------------------------------------- config
def test_command_line_overrides_and_types(tmp_path):
    cfg = parse_args(["--lr=3e-4", "--batch_size", "4", "--compile", "--out_dir=x", "--preset=gpt2"])
    assert cfg.lr == 3e-4 and cfg.batch_size == 4 and cfg.compile is True and cfg.out_dir == "x"
    assert cfg.model == "gpt2" and cfg.tokens_per_step == 524_288  # from the preset
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"lr": 1, "max_steps": 7}))
    cfg = parse_args([f"--config={config_file}", "--max_steps=9"])
    assert cfg.lr == 1.0 and cfg.max_steps == 9


@pytest.mark.parametrize("argv", [
    ["--max-steps", "7", "--tokens-per-step=512", "--gradient-checkpointing", "--out-dir=x"],
    ["--max_steps", "7", "--tokens_per_step=512", "--gradient_checkpointing", "--out_dir=x"],
    ["--max-steps=7", "--tokens_per_step", "512", "--gradient-checkpointing=true", "--out_dir", "x"],
], ids=["kebab", "snake", "mixed"])
def test_kebab_and_snake_spellings_set_the_same_setting(argv):
    cfg = parse_args(argv)
    assert (cfg.max_steps, cfg.tokens_per_step, cfg.gradient_checkpointing, cfg.out_dir) == (7, 512, True, "x")
    assert parse_args(["--max-steps=3", "--max_steps=4"]).max_steps == 4  # the last one given wins


@pytest.mark.parametrize("argv, expected", [
    (["--tensorboard=true"], True), (["--tensorboard"], True), (["--tensorboard", "yes"], True),
    (["--tensorboard=0"], False), (["--tensorboard", "off", "--lr=1"], False), ([], False),
    (["--gradient_checkpointing=on", "--tensorboard=1"], True),
])
def test_booleans_take_a_word_or_stand_alone(argv, expected):
    assert parse_args(argv).tensorboard is expected


@pytest.mark.parametrize("argv, message", [
    (["--learning_rate=1"], "unknown setting 'learning_rate'"),
    (["--batch_sise=2"], "did you mean --batch_size"),
    (["--batch_size=two"], "--batch_size takes an integer, got 'two'"),
    (["--compile=maybe"], "--compile takes true or false"),
    (["--preset=gpt5"], "unknown --preset 'gpt5'"),
    (["--min_lr=1", "--lr=0.1"], "min_lr <= lr"),
    (["lr=1"], "settings are written --key=value"),
    (["--optimizer=sgd"], "--optimizer must be torch"),
    (["--backend=cudnn"], "--backend must be auto, cuda, triton or torch"),
    # the kebab spelling: errors echo the spelling typed
    (["--batch-sise=2"], "did you mean --batch-size"),
    (["--batch-size=two"], "--batch-size takes an integer, got 'two'"),
    (["--max-steps"], "--max-steps needs a value"),
    (["--confg=run.json"], "did you mean --config"),
    # argparse would take a unique prefix for the whole flag; a shortened flag is refused, with the candidates
    (["--warmup=3"], r"unknown setting 'warmup' .*did you mean --warmup-steps"),
    (["--max=3"], r"unknown setting 'max' .*did you mean --max-steps, --max-minutes"),
    (["--dropout=1"], r"--dropout must be in \[0, 1\), got 1.0"),
    (["--block-size=0"], "--block-size must be at least 1, got 0"),
    # every numeric range, checked in one place: the flag, the value, and what the value means
    (["--weight-decay=-5"], r"--weight-decay must be >= 0, got -5.0 \(0: no weight decay\)"),
    (["--grad-clip=-1"], r"--grad-clip must be >= 0, got -1.0 \(0 turns clipping off\)"),
    (["--max-minutes=-1"], r"--max-minutes must be >= 0, got -1.0 \(0: no time limit\)"),
    (["--lr=nan"], "--lr must be a finite number, got nan"),
    (["--lr=0"], r"--lr must be > 0, got 0.0"),
    (["--beta2=1"], r"--beta2 must be in \[0, 1\), got 1.0"),
    (["--warmup-steps=-1"], "--warmup-steps must be >= 0, got -1"),
    (["--seed=-3"], r"--seed must be in \[0, 2\^63\), got -3"),
])
def test_bad_settings_are_clear_errors(argv, message):
    with pytest.raises(ConfigError, match=message):  # a ValueError, as before
        parse_args(argv)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"lr": "fast"}')
    with pytest.raises(ConfigError, match="lr should be float"):
        parse_args([f"--config={bad}"])
    bad.write_text('{"nope": 1}')
    with pytest.raises(ConfigError, match="unknown setting 'nope'"):
        parse_args([f"--config={bad}"])
    with pytest.raises(ConfigError, match="no such file"):
        parse_args([f"--config={tmp_path / 'missing.json'}"])


def test_help_lists_every_setting_with_its_default(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert help_text() in out
    # one entry per flag; argparse wraps long help lines, so compare with the whitespace folded
    entries = {chunk.split()[0]: " ".join(chunk.split()) for chunk in re.split(r"\n  (?=--)", out)}
    defaults = TrainConfig()
    for name in TrainConfig.__dataclass_fields__:
        value = getattr(defaults, name)
        shown = str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str) else value
        assert f"(default: {shown})" in entries[flag(name)], name
    assert "(default: 0.003)" in entries["--lr"] and "(default: 'out')" in entries["--out-dir"]
    assert "--max_steps" not in entries  # the older spelling is taken, not listed
    assert "--preset" in entries and "--config" in entries


def test_main_prints_a_bad_setting_or_data_as_one_line(tmp_path, small_shards, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = [
        (["--batch-size=two"], "--batch-size takes an integer, got 'two'"),
        (["--data", str(small_shards), "--out-dir", str(tmp_path / "a"), "--model=gpt5", "--device=cpu"],
         "--model 'gpt5' is not a model preset"),
        (["--data", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "b"), "--device=cpu"],
         str(tmp_path / "missing")),
        (["--out-dir", str(tmp_path / "c"), "--device=tpu"], "--device tpu: not a device"),
        # before any work: the data is not even looked at
        (["--data", str(tmp_path / "missing"), "--out-dir", str(a_file), "--device=cpu"],
         f"--out-dir {a_file} is a file, not a folder"),
        (["--out-dir", str(a_file / "below"), "--device=cpu"], f"--out-dir {a_file / 'below'}: cannot create"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--out-dir", str(tmp_path / "d"), "--device=cuda"], "--device cuda: no CUDA GPU is visible"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (argv, err)


def test_main_lets_other_errors_keep_their_traceback(tmp_path, small_shards, monkeypatch):
    """A failure from inside training (CUDA, torch, a bug) is not a bad setting: main does not turn it into
    one line and exit 2, it propagates."""
    def fail():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(Trainer, "train_step", lambda self: fail())
    argv = ["--data", str(small_shards), "--out-dir", str(tmp_path), "--device=cpu", "--block-size=32",
            "--batch-size=2", "--max-steps=2", "--max-minutes=0"]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        main(argv)


@pytest.mark.parametrize("device_name, peak", [
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835.5e12), ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_mfu_peak_is_the_gpu_variants_own(monkeypatch, device_name, peak):
    """The trainer's peak comes from gpt2fast.hardware: an H100 PCIe is not measured against the SXM peak."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    assert train.peak_flops(torch.device("cuda")) == (pytest.approx(peak) if peak else None)
    assert train.peak_flops(torch.device("cpu")) is None


def test_mfu_divides_by_the_one_flops_formula(tmp_path, small_shards, monkeypatch):
    monkeypatch.setattr(train, "peak_flops", lambda device: 1e12)
    trainer = Trainer(quick(tmp_path, small_shards, max_steps=2), log=lambda s: None)
    trainer.run()
    per_token = model_flops_per_token(trainer.model.config, seq=32)
    for row in metrics(tmp_path / "out").values():
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * per_token / 1e12)


def test_learning_rate_warms_up_then_decays():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.55)
    assert learning_rate(110, cfg) == pytest.approx(0.1)
    assert all(learning_rate(s, cfg) >= learning_rate(s + 1, cfg) for s in range(10, 120))


# ------------------------------------------------------------------------------------------ training
def test_training_lowers_the_loss_and_writes_everything(tmp_path, small_shards):
    cfg = quick(tmp_path, small_shards, max_steps=30, eval_interval=10, batch_size=4)
    result = Trainer(cfg, log=lambda s: None).run()
    m = metrics(tmp_path / "out")
    assert sorted(m) == list(range(1, 31))
    assert m[30]["val_loss"] < m[10]["val_loss"] < math.log(50257)
    assert (tmp_path / "out" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from gpt2fast.model import GPT2

    reloaded = GPT2.from_pretrained(result["checkpoint"], backend="torch")
    assert reloaded.config.block_size == 32


def test_gradient_accumulation_matches_one_big_batch(tmp_path, small_shards):
    big = Trainer(quick(tmp_path / "a", small_shards, batch_size=4, max_steps=2), log=lambda s: None)
    small = Trainer(quick(tmp_path / "b", small_shards, batch_size=2, tokens_per_step=128, max_steps=2),
                    log=lambda s: None)
    assert small.accum == 2
    for _ in range(2):
        assert small.train_step() == pytest.approx(big.train_step(), rel=1e-5)
    for pa, pb in zip(big.model.parameters(), small.model.parameters()):
        # Adam divides by the gradient's own scale, so summation-order noise on near-zero gradients shows
        # up as (tiny) absolute differences after a step
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=5e-5)


def test_resume_continues_exactly(tmp_path, small_shards):
    whole = tmp_path / "whole"
    Trainer(quick(whole, small_shards), log=lambda s: None).run()
    expected = metrics(whole / "out")

    part = tmp_path / "part"
    Trainer(quick(part, small_shards), log=lambda s: None).run()
    import shutil

    shutil.rmtree(part / "out" / "ckpt_0000006")  # as if the run had died after step 3's checkpoint
    resumed = Trainer(quick(part, small_shards, resume=True), log=lambda s: None)
    assert resumed.step == 3
    resumed.run()
    got = metrics(part / "out")
    for step in (4, 5, 6):
        assert got[step]["loss"] == expected[step]["loss"], step


def test_our_adamw_trains_like_torchs(tmp_path, small_shards):
    """--optimizer=gpt2fast (on the CPU its PyTorch loop; on a GPU one CUDA launch per group) takes the same
    steps as torch.optim.AdamW, and resumes exactly from its checkpoint like it."""
    ref = Trainer(quick(tmp_path / "ref", small_shards, max_steps=4), log=lambda s: None)
    ours = Trainer(quick(tmp_path / "ours", small_shards, max_steps=4, optimizer="gpt2fast"), log=lambda s: None)
    from gpt2fast.ops.adamw import AdamW

    assert isinstance(ours.optimizer, AdamW)
    for _ in range(4):
        assert ours.train_step() == pytest.approx(ref.train_step(), rel=1e-5)
    for pa, pb in zip(ref.model.parameters(), ours.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)

    whole = tmp_path / "whole"
    Trainer(quick(whole, small_shards, optimizer="gpt2fast"), log=lambda s: None).run()
    part = tmp_path / "part"
    Trainer(quick(part, small_shards, optimizer="gpt2fast"), log=lambda s: None).run()
    import shutil

    shutil.rmtree(part / "out" / "ckpt_0000006")
    Trainer(quick(part, small_shards, optimizer="gpt2fast", resume=True), log=lambda s: None).run()
    expected, got = metrics(whole / "out"), metrics(part / "out")
    for step in (4, 5, 6):
        assert got[step]["loss"] == expected[step]["loss"], step


def test_resume_refuses_another_model_shape(tmp_path, small_shards):
    Trainer(quick(tmp_path, small_shards, max_steps=3), log=lambda s: None).run()
    with pytest.raises(ConfigError, match="model of another shape"):
        Trainer(quick(tmp_path, small_shards, resume=True, block_size=64), log=lambda s: None)


def test_non_finite_losses_are_skipped_then_stop(tmp_path, small_shards, monkeypatch):
    trainer = Trainer(quick(tmp_path, small_shards, max_bad_steps=3), log=lambda s: None)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    monkeypatch.setattr(trainer, "train_step", lambda: float("nan"))
    with pytest.warns(UserWarning, match="the loss is nan; the step was skipped"):
        with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
            trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_out_of_memory_names_the_knobs(tmp_path, small_shards, monkeypatch):
    trainer = Trainer(quick(tmp_path, small_shards, batch_size=2), log=lambda s: None)

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "train_step", oom)
    with pytest.raises(RuntimeError, match=r"out of GPU memory at micro-batch 2 x 32: lower --batch-size .*"
                                           r"--gradient-checkpointing=true"):
        trainer.run()


def test_tensorboard_scalars(tmp_path, small_shards, monkeypatch):
    """--tensorboard=true writes every metric of metrics.jsonl as a scalar; without the package it says how to
    get it before training starts."""
    import sys
    import types

    written = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            written.append(("open", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def close(self):
            written.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    Trainer(quick(tmp_path, small_shards, max_steps=3, tensorboard=True), log=lambda s: None).run()
    assert written[0] == ("open", str(tmp_path / "out" / "tensorboard")) and written[-1] == ("close",)
    logged = metrics(tmp_path / "out")
    assert ("train/loss", logged[2]["loss"], 2) in written
    assert ("train/val_loss", logged[3]["val_loss"], 3) in written
    assert {w[0] for w in written[1:-1]} >= {"train/loss", "train/lr", "train/tokens_per_s", "train/val_ppl"}

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ConfigError, match="needs the tensorboard package"):
        Trainer(quick(tmp_path / "again", small_shards, tensorboard=True), log=lambda s: None).run()
    assert not (tmp_path / "again" / "out" / "metrics.jsonl").exists()


def test_interrupt_saves_a_checkpoint(tmp_path, small_shards, monkeypatch):
    trainer = Trainer(quick(tmp_path, small_shards), log=lambda s: None)
    calls = {"n": 0}
    real = trainer.train_step

    def step_then_interrupt():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(trainer, "train_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert (tmp_path / "out" / "ckpt_0000002" / "model.safetensors").is_file()


def test_a_failed_checkpoint_write_leaves_the_last_one_whole(tmp_path, small_shards, monkeypatch):
    """The disk fills while step 6's checkpoint is written (injected: tests/test_faults.py fills a real one):
    step 3's stays, the partial copy is removed, and the error says so, with the sizes and the fix."""
    def full_disk(phase, step):
        if (phase, step) == ("ckpt.state", 6):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(train, "_fault_hook", full_disk)
    out = tmp_path / "out"
    with pytest.raises(train.DiskFullError) as caught:
        Trainer(quick(tmp_path, small_shards), log=lambda s: None).run()
    message = str(caught.value)
    assert f"cannot write checkpoint {out / 'ckpt_0000006'}: the disk is full (the checkpoint needs about" in message
    assert f"the previous checkpoint {out / 'ckpt_0000003'} is intact" in message and "--resume" in message
    assert isinstance(caught.value, train.InputError)  # main prints it as one line
    assert [p.name for p in train.checkpoint_dirs(out)] == ["ckpt_0000003"]
    assert not (out / ".tmp_ckpt_0000006").exists()
    assert train.read_checkpoint(out / "ckpt_0000003")[0]["step"] == 3


def test_a_checkpoint_is_safetensors_and_json_with_checksums(tmp_path, small_shards):
    """No pickle: the weights and every tensor of the trainer's state in safetensors, the rest in JSON, and a
    manifest of sizes and sha256s; GPT2.from_pretrained and transformers read the folder as it is."""
    Trainer(quick(tmp_path, small_shards, max_steps=3), log=lambda s: None).run()
    folder = tmp_path / "out" / "ckpt_0000003"
    assert sorted(p.name for p in folder.iterdir()) == ["checksums.json", "config.json", "model.safetensors",
                                                        "trainer_state.json", "trainer_state.safetensors"]
    manifest = json.loads((folder / "checksums.json").read_text())
    assert sorted(manifest["files"]) == sorted(train.CHECKPOINT_FILES)
    for name, entry in manifest["files"].items():
        assert entry == train.checksum_entry(folder / name), name
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["loader"]["position"] == 3 * 2 and state["config"]["max_steps"] == 3
    from safetensors.torch import load_file

    tensors = load_file(folder / "trainer_state.safetensors")
    assert tensors["rng/torch"].dtype == torch.uint8
    assert any(key.startswith("optimizer/") and key.endswith("/exp_avg_sq") for key in tensors)


def test_a_resumed_run_keeps_its_history(tmp_path, small_shards):
    """metrics.jsonl after a resume: the steps up to the checkpoint once, then the new ones; the plot's history
    includes the checkpoint's own step."""
    Trainer(quick(tmp_path, small_shards, max_steps=4), log=lambda s: None).run()  # ckpt_3, ckpt_4, steps 1-4
    import shutil

    shutil.rmtree(tmp_path / "out" / "ckpt_0000004")
    resumed = Trainer(quick(tmp_path, small_shards, max_steps=4, resume=True), log=lambda s: None)
    assert [h[0] for h in resumed.history] == [1, 2, 3]
    assert sorted(metrics(tmp_path / "out")) == [1, 2, 3]  # step 4 is cut: it is trained again
    resumed.run()
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def test_data_problems_are_clear_errors_before_training(tmp_path, small_shards):
    with pytest.raises(data.DataError, match="fewer than block_size"):
        Trainer(quick(tmp_path, small_shards, block_size=100_000, model="gpt2"), log=lambda s: None)
    from gpt2fast.model import GPT2, GPT2Config

    GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=64, block_size=16, vocab_size=1000)).save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="exceeds the model's context of 16"):
        Trainer(quick(tmp_path, small_shards, init_from=str(tmp_path / "m")), log=lambda s: None)
    with pytest.raises(ConfigError, match="token ids beyond the model's vocabulary"):
        Trainer(quick(tmp_path, small_shards, init_from=str(tmp_path / "m"), block_size=16), log=lambda s: None)
    with pytest.raises(ConfigError, match="not a multiple of batch_size x block_size"):
        Trainer(quick(tmp_path, small_shards, tokens_per_step=100), log=lambda s: None)


def test_loss_curve_matches_plain_pytorch_gpt2(small_shards):
    """The first steps of our model and trainer pieces against nanoGPT-style stock PyTorch, same weights and
    batches: the losses stay within 1% (in fp32 on the CPU they agree far closer)."""
    from gpt2fast.model import GPT2, GPT2Config
    from gpt2fast.plain_gpt2 import PlainGPT2
    from gpt2fast.train import make_optimizer

    torch.manual_seed(0)
    config = GPT2Config.preset("gpt2-tiny", block_size=32)
    ours, plain = GPT2(config, backend="torch"), PlainGPT2(config)
    plain.load_state_dict(ours.state_dict())
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=20)
    loader = data.TokenLoader(small_shards, "train", 4, 32, seed=0)
    batches = [loader.next_batch() for _ in range(20)]
    curves = []
    for model in (ours, plain):
        opt = make_optimizer(model, cfg, torch.device("cpu"))
        losses = []
        for step, (x, y) in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, cfg)
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0][-1] < curves[0][0] - 1  # it learns
    for step, (a, b) in enumerate(zip(*curves)):
        assert abs(a - b) <= 0.01 * b, (step, a, b)


def test_a_backend_that_cannot_run_here_is_one_line_and_exit_2(tmp_path, small_shards, capsys):
    """--backend=cuda on a machine without CUDA: the ops' BackendUnavailable, reported as one line."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the message on a machine without CUDA")
    argv = [f"--data={small_shards}", f"--out-dir={tmp_path / 'out'}", "--block-size=32", "--batch-size=2",
            "--max-steps=1", "--device=cpu", "--backend=cuda"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "CUDA C++ backend cannot run here" in err and "Traceback" not in err


def test_the_default_run_learns_its_own_vocabulary_and_writes_a_summary(tmp_path, capsys):
    """No --data: the packaged corpus with a BPE vocabulary learned from its training split; summary.json and
    the closing line report the loss per token and per byte beside the unigram baseline; the checkpoint carries
    the vocabulary, so generate decodes with it."""
    from gpt2fast.generate import load_tokenizer

    out = tmp_path / "out"
    argv = [f"--out-dir={out}", "--vocab=corpus:300", "--max-steps=4", "--batch-size=2", "--block-size=32",
            "--eval-interval=2", "--eval-batches=1", "--warmup-steps=1", "--device=cpu"]
    assert main(argv) == 0
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("steps", "seconds", "tokens_per_s", "val_loss", "unigram_entropy", "val_bits_per_byte",
                "unigram_bits_per_byte"):
        assert key in summary, key
    assert summary["steps"] == 4 and summary["vocab_size"] == 300
    assert f"{summary['val_bits_per_byte']:.3f} bits/byte" in closing and "unigram" in closing
    checkpoint = Path(summary["checkpoint"])
    assert load_tokenizer(checkpoint).n_vocab == 300
    assert json.loads((checkpoint / "config.json").read_text())["vocab_size"] == 300


def test_vocab_gpt2_keeps_gpt2s_tokenizer(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path / "out"), vocab="gpt2", max_steps=1, batch_size=2, block_size=32,
                      device="cpu")
    trainer = Trainer(cfg, log=lambda s: None)
    assert trainer.tokenizer.n_vocab == 50257 and trainer.model.config.vocab_size == 50257
    assert trainer.data_dir == tmp_path / "out" / "data"
