"""`python -m gpt2fast.generate`: streaming text from a checkpoint."""
from __future__ import annotations

import io
import subprocess
import sys

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
