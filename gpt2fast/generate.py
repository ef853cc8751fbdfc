"""`python -m gpt2fast.generate`: stream text from a GPT-2 checkpoint and a prompt.

    python -m gpt2fast.generate --checkpoint out/ --prompt "The whale" --max-new-tokens 200 --seed 0

The checkpoint is a folder with config.json and model.safetensors (ours, or a Hugging Face GPT-2); its
tokenizer is the folder's encoder.json + vocab.bpe when present, else GPT-2's.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from gpt2fast._cli import at_least
from gpt2fast.devices import pick_device


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def _temperature(text: str) -> float:
    value = _number(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 is greedy), got {text}")
    return value


def _top_p(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def load_tokenizer(checkpoint: Path):
    from gpt2fast.tokenizer import Tokenizer

    if (checkpoint / "encoder.json").is_file() and (checkpoint / "vocab.bpe").is_file():
        return Tokenizer.from_files(checkpoint / "encoder.json", checkpoint / "vocab.bpe")
    return Tokenizer.gpt2()


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int, out=sys.stdout, **sampling) -> str:
    """Writes the sampled continuation to ``out`` as it is produced and returns it."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt, allowed_special="all") or [tokenizer.eot_token]
    idx = torch.tensor(ids, dtype=torch.long, device=device)[None]
    decoder = tokenizer.stream_decoder()
    eot = tokenizer.special_tokens.get("<|endoftext|>")
    pieces = []
    for nxt in model.generate_stream(idx, max_new_tokens, eot_token=eot, **sampling):
        token = int(nxt[0])
        if token == eot:
            break
        piece = decoder.feed(token)
        pieces.append(piece)
        out.write(piece)
        out.flush()
    tail = decoder.flush()
    out.write(tail + "\n")
    return "".join(pieces) + tail


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2fast.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="folder with config.json and model.safetensors")
    parser.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=200)
    parser.add_argument("--temperature", type=_temperature, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=at_least(1), default=200)
    parser.add_argument("--top-p", type=_top_p, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1...")
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    args = parser.parse_args(argv)

    from gpt2fast.model import GPT2

    checkpoint = Path(args.checkpoint)
    try:
        device = pick_device(args.device)
        model = GPT2.from_pretrained(checkpoint, backend=args.backend).to(device).eval()
        tokenizer = load_tokenizer(checkpoint)
        sys.stdout.write(args.prompt)
        stream_text(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
