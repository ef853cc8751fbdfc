"""`python -m gpt2fast.generate`: streaming text from a checkpoint."""
from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest
import torch

from gpt2fast.generate import main, stream_text
from gpt2fast.model import GPT2, GPT2Config
from gpt2fast.tokenizer import Tokenizer


def small_gpt2_checkpoint(path):
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=64, block_size=64), backend="torch")
    model.save_pretrained(path)
    return model


def test_stream_text_writes_the_greedy_continuation(tmp_path):
    model = small_gpt2_checkpoint(tmp_path).eval()
    tok = Tokenizer.gpt2()
    out = io.StringIO()
    text = stream_text(model, tok, "Call me", 12, out=out, temperature=0)
    assert out.getvalue() == text + "\n"
    prompt = tok.encode("Call me")
    ids = model.generate(torch.tensor([prompt]), 12, temperature=0)[0, len(prompt):].tolist()
    if tok.eot_token in ids:
        ids = ids[: ids.index(tok.eot_token)]
    assert text == tok.decode(ids)


def test_cli_streams_from_a_checkpoint(tmp_path):
    small_gpt2_checkpoint(tmp_path)
    run = subprocess.run([sys.executable, "-m", "gpt2fast.generate", "--checkpoint", str(tmp_path), "--prompt",
                          "Hello", "--max-new-tokens", "8", "--seed", "0", "--backend", "torch"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Hello") and len(run.stdout) > len("Hello\n")


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,expected", [
    ("--temperature", "nan", "must be a finite number >= 0"), ("--temperature", "-1", "must be a finite number"),
    ("--max-new-tokens", "-5", "must be an integer >= 1"), ("--top-k", "0", "must be an integer >= 1"),
    ("--top-p", "1.5", r"must lie in \(0, 1\]"), ("--top-p", "nan", r"must lie in \(0, 1\]")])
def test_bad_sampling_settings_are_refused_before_loading(tmp_path, capsys, flag, value, expected):
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(tmp_path), flag, value])
    assert exit_.value.code == 2
    assert re.search(rf"{flag}: {expected}", capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    small_gpt2_checkpoint(tmp_path)
    assert main(["--checkpoint", str(tmp_path), "--device", "cuda", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA GPU is visible here" in err and "Traceback" not in err
    assert main(["--checkpoint", str(tmp_path), "--device", "tpu:0"]) == 2
    err = capsys.readouterr().err
    assert "--device tpu:0:" in err and ("not a device" in err or "only cpu and cuda" in err), err
