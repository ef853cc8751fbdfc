"""`python -m gpt2fast.tokenizer`: encode, decode, train and benchmark from the command line."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from gpt2fast._cli import at_least
from gpt2fast.textio import default_corpus_path, iter_documents
from gpt2fast.tokenizer import Tokenizer


def load_vocab(spec: str | None) -> Tokenizer:
    if spec is None or spec == "gpt2":
        return Tokenizer.gpt2()
    path = Path(spec)
    if path.is_dir():
        return Tokenizer.from_files(path / "encoder.json", path / "vocab.bpe")
    if path.suffix == ".tiktoken":
        return Tokenizer.from_tiktoken(path)
    raise SystemExit(f"--vocab {spec!r}: expected 'gpt2', a folder with encoder.json and vocab.bpe, or a "
                     f".tiktoken file")


def read_input(text: str | None, file: str | None) -> str:
    if text is not None and file is not None:
        raise SystemExit("give the text either as an argument or with --file, not both")
    if file is not None:
        path = Path(file)
        if path.is_dir():
            raise SystemExit(f"error: --file {file} is a folder; give a text file (or the text itself)")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SystemExit(f"error: --file {file} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if text is not None:
        return text
    return sys.stdin.read()


def cmd_encode(args) -> int:
    tok = load_vocab(args.vocab)
    text = read_input(args.text, args.file)
    ids = tok.encode(text, allowed_special="all" if args.allow_special else frozenset())
    print(len(ids) if args.count else " ".join(map(str, ids)))
    return 0


def cmd_decode(args) -> int:
    tok = load_vocab(args.vocab)
    words = args.ids if args.ids else read_input(None, args.file).split()
    try:
        ids = [int(w) for w in words]
    except ValueError as e:
        raise SystemExit(f"token ids must be integers: {e}") from None
    sys.stdout.write(tok.decode(ids))
    sys.stdout.write("\n")
    return 0


def _writable_folder(out: str) -> None:
    """Checked before training, so a bad --out costs nothing."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SystemExit(f"error: --out {out} is a file; give a folder for encoder.json and vocab.bpe")
    parent = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise SystemExit(f"error: --out {out}: {parent} is not writable")


def cmd_train(args) -> int:
    _writable_folder(args.out)
    texts = list(iter_documents(args.inputs))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    start = time.perf_counter()
    tok = Tokenizer.train(texts, args.vocab_size, special_tokens=args.special, num_threads=args.threads)
    elapsed = time.perf_counter() - start
    enc_path, bpe_path = tok.save(args.out)
    print(f"trained {tok.n_vocab} tokens on {len(texts)} documents ({n_bytes / 1e6:.1f} MB) in {elapsed:.2f} s")
    print(f"wrote {enc_path} and {bpe_path}")
    return 0


def _best_seconds(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _tiktoken_gpt2():
    """tiktoken's GPT-2 encoding built from our shipped files (no network), or None without tiktoken."""
    try:
        import tiktoken
        import tiktoken.load
    except ImportError:
        return None
    from importlib import resources

    assets = resources.files("gpt2fast") / "assets"
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(assets / "vocab.bpe"), encoder_json_file=str(assets / "encoder.json"))
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
    return tiktoken.Encoding("gpt2", pat_str=pattern, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})


def cmd_bench(args) -> int:
    inputs = args.inputs or [str(default_corpus_path())]
    texts = list(iter_documents(inputs))
    joined = "".join(texts)
    n_bytes = len(joined.encode("utf-8"))
    threads = args.threads if args.threads is not None else os.cpu_count() or 1
    tok = load_vocab(args.vocab)
    rows = [("gpt2fast encode_ordinary (1 thread)", _best_seconds(lambda: tok.encode_ordinary(joined), args.repeat)),
            (f"gpt2fast encode_ordinary_batch ({threads} threads)",
             _best_seconds(lambda: tok.encode_ordinary_batch(texts, num_threads=threads), args.repeat))]
    peer = _tiktoken_gpt2() if args.vocab in (None, "gpt2") else None
    if peer is not None:
        rows.append(("tiktoken encode_ordinary (1 thread)",
                     _best_seconds(lambda: peer.encode_ordinary(joined), args.repeat)))
        rows.append((f"tiktoken encode_ordinary_batch ({threads} threads)",
                     _best_seconds(lambda: peer.encode_ordinary_batch(texts, num_threads=threads), args.repeat)))
    print(f"{len(texts)} documents, {n_bytes / 1e6:.2f} MB of UTF-8, best of {args.repeat}")
    for name, seconds in rows:
        print(f"  {name:<45} {n_bytes / seconds / 1e6:8.1f} MB/s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gpt2fast.tokenizer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    vocab_help = "'gpt2' (default), a folder with encoder.json + vocab.bpe, or a .tiktoken file"
    p = sub.add_parser("encode", help="print the token ids of a text")
    p.add_argument("text", nargs="?", help="the text (default: --file, else standard input)")
    p.add_argument("--file", help="read the text from this file")
    p.add_argument("--vocab", help=vocab_help)
    p.add_argument("--allow-special", action="store_true", help="encode special-token text as special tokens")
    p.add_argument("--count", action="store_true", help="print only the number of tokens")
    p.set_defaults(run=cmd_encode)

    p = sub.add_parser("decode", help="print the text of token ids")
    p.add_argument("ids", nargs="*", help="token ids (default: --file, else standard input)")
    p.add_argument("--file", help="read whitespace-separated ids from this file")
    p.add_argument("--vocab", help=vocab_help)
    p.set_defaults(run=cmd_decode)

    p = sub.add_parser("train", help="learn a byte-level BPE vocabulary and save it in GPT-2's format")
    p.add_argument("inputs", nargs="+", help="text, JSON Lines (a 'text' field) or .gz files, or folders")
    p.add_argument("--vocab-size", type=int, required=True, help="tokens in all: 256 bytes + merges + specials")
    p.add_argument("--out", required=True, help="folder for encoder.json and vocab.bpe")
    p.add_argument("--special", nargs="*", default=["<|endoftext|>"], help="special tokens (default: <|endoftext|>)")
    p.add_argument("--threads", type=at_least(1), default=None, help="threads for counting (default: all cores)")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("bench", help="measure encoding throughput (beside tiktoken when installed)")
    p.add_argument("inputs", nargs="*", help="files or folders (default: the corpus shipped in the package)")
    p.add_argument("--vocab", help=vocab_help)
    p.add_argument("--threads", type=at_least(1), default=None,
                   help="threads for the batch runs (default: all cores)")
    p.add_argument("--repeat", type=at_least(1), default=3, help="runs per measurement; the best is reported")
    p.set_defaults(run=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
