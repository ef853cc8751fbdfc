"""Fault injection (issue 12): kills, Ctrl-C, a full disk, damaged checkpoints and malicious pickles. Each
resumed run ends with the losses, weights, optimizer moments and RNG state of the uninterrupted run, bit for bit
on the CPU; nothing already written is lost; and each message names the file and the fix.

The runs are fault_testing's tiny model (9 steps, a checkpoint every 3) on one thread, here and in the child
processes, so that their sums are the same float operations in the same order."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from fault_testing import TINY_MODEL, child_command, register_tiny_model, run_child, settings

from gpt2fast import scaling, train
from gpt2fast.errors import DataError
from gpt2fast.train import TrainConfig, Trainer, checkpoint_dirs, main, read_checkpoint

STEPS = list(range(1, 10))


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_the_tiny_model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    register_tiny_model()
    yield
    torch.set_num_threads(threads)
    from gpt2fast.model import PRESETS

    PRESETS.pop(TINY_MODEL, None)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def config(data, out_dir, **overrides) -> TrainConfig:
    return TrainConfig(**settings(data, out_dir, **overrides))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_shards, one_thread_and_the_tiny_model):
    """The uninterrupted run: its metrics by step and the digests of its last checkpoint's tensors."""
    out = tmp_path_factory.mktemp("reference") / "out"
    Trainer(config(small_shards, out), log=lambda s: None).run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == STEPS
    last = out / "ckpt_0000009"
    return {"metrics": {r["step"]: r for r in rows}, "weights": sha256(last / "model.safetensors"),
            "state": sha256(last / "trainer_state.safetensors"),
            "bytes": sum(f.stat().st_size for f in last.iterdir())}


class Crash(BaseException):
    """Stands in for a kill in the runs that only set the scene: nothing of the trainer catches it."""


def crash_at(monkeypatch, phase: str, step: int):
    def hook(reached, at):
        if (reached, at) == (phase, step):
            raise Crash

    monkeypatch.setattr(train, "_fault_hook", hook)


@pytest.fixture(scope="module")
def crashed_at_step_8(tmp_path_factory, small_shards, one_thread_and_the_tiny_model):
    """A run that died as step 8 began: ckpt_3 and ckpt_6 (two kept), metrics of steps 1-7."""
    out = tmp_path_factory.mktemp("crashed") / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        crash_at(monkeypatch, "step.start", 8)
        with pytest.raises(Crash):
            Trainer(config(small_shards, out, keep_checkpoints=2), log=lambda s: None).run()
    assert [p.name for p in checkpoint_dirs(out)] == ["ckpt_0000003", "ckpt_0000006"]
    return out


@pytest.fixture
def crashed(tmp_path, crashed_at_step_8):
    out = tmp_path / "out"
    shutil.copytree(crashed_at_step_8, out)
    return out


def finish(data, out, reference, resumed_at: int, keep: int = 1, **overrides):
    """--resume to the end; check it resumed at ``resumed_at`` and ended as the uninterrupted run, with each
    step logged once, the checkpoints kept that should be, and nothing left of interrupted writes. The log."""
    log = []
    trainer = Trainer(config(data, out, resume=True, keep_checkpoints=keep, **overrides), log=log.append)
    assert trainer.step == resumed_at, log
    trainer.run()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == STEPS  # every step once: the replayed ones are not repeated
    for row in rows:
        want = reference["metrics"][row["step"]]
        assert (row["loss"], row.get("val_loss"), row["lr"]) == (want["loss"], want.get("val_loss"), want["lr"]), row
    last = out / "ckpt_0000009"
    assert sha256(last / "model.safetensors") == reference["weights"]  # the weights, bit for bit
    assert sha256(last / "trainer_state.safetensors") == reference["state"]  # moments and RNG too
    ours = sorted(p.name for p in out.iterdir() if "ckpt_" in p.name)
    assert ours == [p.name for p in checkpoint_dirs(out)] and len(ours) == keep, ours  # no .tmp_ / .del_ left
    return log


def assert_usable(folder: Path, step: int):
    state, _ = read_checkpoint(folder)  # every checksum, every tensor finite
    assert state["step"] == step


# ------------------------------------------------------------------------ SIGKILL in every phase
# (phase, step of the save it hits, the checkpoint a resume must find). The second save (step 6) finds ckpt_3
# to fall back on and has ckpt_3 to clean up (one checkpoint kept); the last save (step 9) is also the one that
# used to be written twice.
KILLS = [
    ("ckpt.start", 6, 3), ("ckpt.weights", 6, 3), ("ckpt.state", 6, 3),
    ("ckpt.manifest", 6, 6),  # complete under its temporary name: the resume renames it into place
    ("ckpt.renamed", 6, 6), ("cleanup.moved", 6, 6), ("cleanup.deleting", 6, 6), ("cleanup.done", 6, 6),
    ("ckpt.manifest", 9, 9), ("ckpt.renamed", 9, 9),
    ("step.backward", 5, 3), ("step.update", 5, 3),  # mid-step: the batch drawn, or applied but not logged
]


@pytest.mark.parametrize("phase, step, resumed_at", KILLS, ids=[f"{p}@{s}" for p, s, _ in KILLS])
def test_sigkill_in_any_phase_resumes_exactly(tmp_path, small_shards, reference, phase, step, resumed_at):
    out = tmp_path / "out"
    child = run_child(settings(small_shards, out), fault=f"{phase}@{step}:KILL")
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    # nothing already written is lost: the newest checkpoint before the kill is still whole
    before = max(s for s in (3, 6, 9) if s < step or (s == step and resumed_at == step))
    folder = out / f"ckpt_{before:07d}"
    if not folder.exists():  # killed with the complete copy still under its temporary name
        folder = out / f".tmp_ckpt_{before:07d}"
    assert_usable(folder, before)
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, logged[-1] + 1)) and logged[-1] >= before
    log = finish(small_shards, out, reference, resumed_at)
    if folder.name.startswith(".tmp_"):
        assert any(f"{folder.name}, which a crash left whole" in line for line in log), log
    elif phase in ("ckpt.weights", "ckpt.state") and step == 6:
        assert any("removed" in line and ".tmp_ckpt_0000006" in line for line in log), log


def test_sigkill_while_replacing_a_damaged_checkpoint(crashed, small_shards, reference):
    """A resume that fell back past a damaged ckpt_6 replaces it when it gets to step 6: it renames the damaged
    one away before renaming the new one in. Killed between the two renames, the complete new copy is used."""
    flip_a_bit(crashed / "ckpt_0000006" / "model.safetensors")
    child = run_child(settings(small_shards, crashed, resume=True, keep_checkpoints=2),
                      fault="ckpt.moved_aside@6:KILL")
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert "ckpt_0000006/model.safetensors is damaged" in child.stderr and "continuing from" in child.stderr
    assert not (crashed / "ckpt_0000006").exists() and (crashed / ".del_ckpt_0000006").is_dir()
    assert_usable(crashed / ".tmp_ckpt_0000006", 6)
    finish(small_shards, crashed, reference, resumed_at=6, keep=2)


# ------------------------------------------------------------------------------------- Ctrl-C
def interrupt_at(monkeypatch, phase: str, step: int):
    sent = []

    def hook(reached, at):
        if (reached, at) == (phase, step) and not sent:  # once: the save on Ctrl-C passes the phase again
            sent.append(at)
            os.kill(os.getpid(), signal.SIGINT)  # a real signal, handled as a Ctrl-C would be

    monkeypatch.setattr(train, "_fault_hook", hook)


# (phase, step, the checkpoint saved on Ctrl-C)
INTERRUPTS = [
    ("step.backward", 5, 4),  # the batch was drawn, not applied: it is put back
    ("step.update", 5, 5),  # the update was applied: Ctrl-C waits until step 5 is logged
    ("ckpt.weights", 6, 6),  # the checkpoint being written is abandoned, then written whole
    ("cleanup.moved", 6, 6),  # the checkpoint is in: kept, and the cleanup finished
]


@pytest.mark.parametrize("phase, step, saved", INTERRUPTS, ids=[f"{p}@{s}" for p, s, _ in INTERRUPTS])
def test_ctrl_c_in_any_phase_saves_a_checkpoint_that_resumes_exactly(tmp_path, small_shards, reference,
                                                                       monkeypatch, phase, step, saved):
    out = tmp_path / "out"
    interrupt_at(monkeypatch, phase, step)
    log = []
    with pytest.raises(KeyboardInterrupt):
        Trainer(config(small_shards, out), log=log.append).run()
    assert f"interrupted: saved {out / f'ckpt_{saved:07d}'}; continue with --resume" in log
    assert [p.name for p in checkpoint_dirs(out)] == [f"ckpt_{saved:07d}"]
    state = train.read_trainer_state(out / f"ckpt_{saved:07d}", tensors=False)
    assert state["loader"]["position"] == saved * 2  # the data position of the last applied batch (2 a step)
    monkeypatch.setattr(train, "_fault_hook", None)
    finish(small_shards, out, reference, resumed_at=saved)


def test_ctrl_c_just_after_a_checkpoint_keeps_it(tmp_path, small_shards, reference, monkeypatch):
    """The checkpoint written at step 3 is exact; the Ctrl-C that follows must not write it again."""
    out, writes = tmp_path / "out", []

    def hook(reached, at):
        if reached == "ckpt.start":
            writes.append(at)
        if (reached, at) == ("step.start", 4):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train, "_fault_hook", hook)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config(small_shards, out), log=lambda s: None).run()
    assert writes == [3]
    monkeypatch.setattr(train, "_fault_hook", None)
    finish(small_shards, out, reference, resumed_at=3)


def test_each_step_is_saved_once(tmp_path, small_shards, monkeypatch):
    """max_steps a multiple of checkpoint_interval: the last step was written twice, the second time deleting
    the first copy before renaming the new one in."""
    writes = []
    monkeypatch.setattr(train, "_fault_hook", lambda reached, at: writes.append(at) if reached == "ckpt.start"
                        else None)
    Trainer(config(small_shards, tmp_path / "out"), log=lambda s: None).run()
    assert writes == [3, 6, 9]


def test_sigint_at_random_steps(tmp_path, small_shards, reference):
    """The command line under a real Ctrl-C, sent when a random number of steps has been logged."""
    seed = int(os.environ.get("GPT2FAST_FAULT_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"
        after = rng.randint(1, 6)
        child = subprocess.Popen(child_command(settings(small_shards, out)), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            if metrics.exists() and metrics.read_text().count("\n") >= after:
                break
            time.sleep(0.002)
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=120)
        context = f"seed {seed}, SIGINT after {after} steps: {stdout[-1000:]} {stderr[-2000:]}"
        assert child.returncode in (130, 0), context  # 0: it had finished before the signal came
        assert "Traceback" not in stderr, context
        saved = checkpoint_dirs(out)[-1]
        if child.returncode == 130 and "interrupted: saved" in stdout:
            assert f"interrupted: saved {saved}; continue with --resume" in stdout, context
        finish(small_shards, out, reference, resumed_at=int(saved.name[5:]))


# ---------------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mount point (root only): yields a function that sets its size in bytes."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()

    def resize(size: int, option: str = "remount,"):
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"{option}size={size}", "tmpfs", str(mount)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")

    resize(4096, option="")
    try:
        yield mount, resize
    finally:
        # lazily if need be: a failed test's traceback can still hold tensors mapped from files on the disk
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_during_a_checkpoint(small_disk, small_shards, reference, capsys):
    mount, resize = small_disk
    resize(int(reference["bytes"] * 1.5))  # room for one checkpoint and a half: the second does not fit
    out = mount / "out"
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in settings(small_shards, out, keep_checkpoints=2).items()]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for words in (f"cannot write checkpoint {out / 'ckpt_0000006'}: the disk is full", "MB are free in",
                  "the checkpoint needs about", f"the previous checkpoint {out / 'ckpt_0000003'} is intact",
                  "Free some space", "--resume"):
        assert words in err, (words, err)
    assert "enforce fail" not in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir() if "ckpt" in p.name) == ["ckpt_0000003"]  # no partial copy
    assert_usable(out / "ckpt_0000003", 3)
    resize(64 << 20)  # space freed: the run goes on from step 3 as if nothing had happened
    finish(small_shards, out, reference, resumed_at=3, keep=2)


# ------------------------------------------------------------------------------ damaged checkpoints
def flip_a_bit(path: Path, where: float = 0.6):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))


def overwrite_weights(path: Path, value: float):
    """Overwrite 64 weights in the middle of a safetensors file's data: still a valid file of finite (or NaN)
    numbers, wrong ones."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    at = header + (len(data) - header) // 2 // 4 * 4
    data[at:at + 256] = torch.full((64,), value, dtype=torch.float32).numpy().tobytes()
    path.write_bytes(bytes(data))


DAMAGE = {
    "finite weights": (lambda f: overwrite_weights(f / "model.safetensors", 37.7), "model.safetensors is damaged"),
    "NaN weights": (lambda f: overwrite_weights(f / "model.safetensors", float("nan")),
                    "model.safetensors is damaged"),
    "truncated weights": (lambda f: os.truncate(f / "model.safetensors", 5000), "model.safetensors is damaged "
                                                                                 "(truncated)"),
    "flipped state bit": (lambda f: flip_a_bit(f / "trainer_state.safetensors"),
                          "trainer_state.safetensors is damaged"),
    "torn state json": (lambda f: os.truncate(f / "trainer_state.json", 100), "trainer_state.json is damaged"),
    "damaged manifest": (lambda f: (f / "checksums.json").write_text("{\"files\": "), "checksums.json is damaged"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_is_named_and_the_one_before_it_used(crashed, small_shards, reference, damage):
    make, message = DAMAGE[damage]
    make(crashed / "ckpt_0000006")
    with pytest.warns(UserWarning) as caught:
        finish(small_shards, crashed, reference, resumed_at=3, keep=2)
    said = " ".join(str(w.message) for w in caught)
    assert f"{crashed / 'ckpt_0000006'} cannot be used" in said and message in said, said
    assert f"continuing from {crashed / 'ckpt_0000003'}" in said


def test_when_every_checkpoint_is_damaged_resume_says_so(crashed, small_shards, capsys):
    shutil.rmtree(crashed / "ckpt_0000003")
    overwrite_weights(crashed / "ckpt_0000006" / "model.safetensors", 37.7)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in settings(small_shards, crashed, resume=True).items()]
    with pytest.warns(UserWarning, match="ckpt_0000006 cannot be used"):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{crashed / 'ckpt_0000006' / 'model.safetensors'} is damaged" in err, err
    assert "Put back a good copy of one, or train without --resume" in err


def test_from_pretrained_checks_what_it_reads(crashed):
    from gpt2fast.model import GPT2

    folder = crashed / "ckpt_0000006"
    GPT2.from_pretrained(folder, backend="torch")
    overwrite_weights(folder / "model.safetensors", 37.7)
    with pytest.raises(DataError, match="model.safetensors is damaged: its sha256 differs"):
        GPT2.from_pretrained(folder, backend="torch")
    (folder / "checksums.json").unlink()  # no manifest (a folder from elsewhere): what safetensors says, named
    os.truncate(folder / "model.safetensors", 5000)
    with pytest.raises(DataError, match=f"{folder / 'model.safetensors'} is not a readable safetensors file"):
        GPT2.from_pretrained(folder, backend="torch")


# ---------------------------------------------------------------------------- metrics and leftovers
def test_a_torn_metrics_line_is_dropped_and_replayed_steps_are_not_repeated(crashed, small_shards, reference):
    """Steps 7 (logged before the crash) and a torn 8 come after the checkpoint of step 6: they are cut, and
    logged again as they are trained again."""
    with open(crashed / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "loss": 10.8')  # the disk filled mid-line
    with pytest.warns(UserWarning, match=f"{crashed / 'metrics.jsonl'}: its last line is torn .*dropped"):
        finish(small_shards, crashed, reference, resumed_at=6, keep=2)


def test_cleanup_removes_half_deleted_checkpoints_of_ours_only(crashed, small_shards, reference):
    """An older gpt2fast deleted a checkpoint file by file: weights without the state. Resume ignores such a
    folder and the next cleanup removes it; a folder that holds files of someone else stays."""
    half = crashed / "ckpt_0000002"
    shutil.copytree(crashed / "ckpt_0000003", half)
    for name in ("trainer_state.safetensors", "trainer_state.json", "checksums.json"):
        (half / name).unlink()
    foreign = crashed / "ckpt_0000001"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    finish_log = []
    trainer = Trainer(config(small_shards, crashed, resume=True, keep_checkpoints=2), log=finish_log.append)
    assert trainer.step == 6
    trainer.run()
    assert not half.exists() and (foreign / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------------- malicious pickles
class Malicious:
    """Unpickling this creates the marker file: what a crafted pickle could do instead (run anything)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def legacy_checkpoint(folder: Path, state: dict):
    """Turn a checkpoint folder into the older layout: the state pickled in trainer_state.pt, no manifest."""
    for name in ("trainer_state.safetensors", "trainer_state.json", "checksums.json"):
        (folder / name).unlink()
    torch.save(state, folder / "trainer_state.pt")


def test_a_checkpoint_of_the_older_layout_still_resumes_exactly(crashed, small_shards, reference):
    state = train.read_trainer_state(crashed / "ckpt_0000006")
    legacy_checkpoint(crashed / "ckpt_0000006", state)
    finish(small_shards, crashed, reference, resumed_at=6, keep=2)


def test_nan_weights_in_a_checkpoint_without_checksums_are_found(crashed, small_shards, reference):
    """The older layout has no manifest: non-finite weights are still named, not met as "lower --lr"."""
    state = train.read_trainer_state(crashed / "ckpt_0000006")
    legacy_checkpoint(crashed / "ckpt_0000006", state)
    overwrite_weights(crashed / "ckpt_0000006" / "model.safetensors", float("nan"))
    with pytest.warns(UserWarning) as caught:
        finish(small_shards, crashed, reference, resumed_at=3, keep=2)
    said = " ".join(str(w.message) for w in caught)
    assert f"{crashed / 'ckpt_0000006' / 'model.safetensors'}: " in said and "holds NaN or infinite values" in said


def test_resume_runs_no_code_from_a_pickle(crashed, small_shards, reference, tmp_path):
    marker = tmp_path / "marker"
    state = train.read_trainer_state(crashed / "ckpt_0000006")
    legacy_checkpoint(crashed / "ckpt_0000006", dict(state, optimizer=Malicious(marker)))
    with pytest.warns(UserWarning) as caught:
        finish(small_shards, crashed, reference, resumed_at=3, keep=2)
    said = " ".join(str(w.message) for w in caught)
    assert f"{crashed / 'ckpt_0000006' / 'trainer_state.pt'} was not loaded: it is damaged, or a pickle that " \
           f"would run code" in said and "Resume only from checkpoints you wrote or trust" in said, said
    assert not marker.exists()


def test_a_pickle_in_place_of_the_state_file_is_refused(crashed, small_shards, tmp_path):
    """trainer_state.safetensors replaced by a pickle, its checksum updated to match (a crafted folder)."""
    marker, folder = tmp_path / "marker", crashed / "ckpt_0000006"
    torch.save({"x": Malicious(marker)}, folder / "trainer_state.safetensors")
    manifest = json.loads((folder / "checksums.json").read_text())
    manifest["files"]["trainer_state.safetensors"] = train.checksum_entry(folder / "trainer_state.safetensors")
    (folder / "checksums.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"{folder / 'trainer_state.safetensors'} is damaged or not ours"):
        read_checkpoint(folder)
    assert not marker.exists()


def test_scaling_fit_runs_no_code_from_a_pickle(crashed, tmp_path, capsys):
    marker = tmp_path / "marker"
    run = tmp_path / "runs" / "a"
    shutil.copytree(crashed, run)
    for folder in checkpoint_dirs(run):
        legacy_checkpoint(folder, {"step": 1, "config": Malicious(marker)})
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "val_loss": 3.0}) + "\n")
    assert scaling.main(["fit", str(tmp_path / "runs"), "--plot", ""]) == 2
    err = capsys.readouterr().err
    assert "trainer_state.pt was not loaded" in err and str(run / "ckpt_0000006") in err, err
    assert not marker.exists()


def test_from_pretrained_runs_no_code_from_a_pickle(crashed, tmp_path):
    from gpt2fast.model import GPT2

    marker, folder = tmp_path / "marker", tmp_path / "hf"
    folder.mkdir()
    shutil.copy(crashed / "ckpt_0000006" / "config.json", folder)
    torch.save({"transformer.wte.weight": Malicious(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(DataError, match=f"{folder / 'pytorch_model.bin'} was not loaded: .* a pickle that would "
                                        f"run code"):
        GPT2.from_pretrained(folder, backend="torch")
    assert not marker.exists()


def test_no_reader_of_ours_unpickles_freely():
    """Every loader is covered above; this keeps a new one from unpickling with code allowed."""
    package = Path(train.__file__).parent
    for source in package.rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        for risky in ("weights_only=False", "pickle.load(", "pickle.loads(", "allow_pickle=True"):
            assert risky not in text, (source, risky)
        for call in re.finditer(r"torch\.load\(", text):
            assert "weights_only=True" in text[call.start():call.start() + 200], (source, text[call.start():][:80])
