"""``python -m gpt2fast.data``: ``prepare`` a folder of shards from raw text, print a prepared folder's ``info``,
or ``verify`` its shards. Every option of ``prepare`` comes from ``PrepareOptions``' fields
(gpt2fast/data/options.py)."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from gpt2fast.data import options
from gpt2fast.data.funnel import funnel_table
from gpt2fast.data.loader import unigram_entropy
from gpt2fast.data.pipeline import prepare
from gpt2fast.data.shards import MANIFEST, ShardDataset, read_manifest
from gpt2fast.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gpt2fast.data",
                                     description="GPT-2's WebText data recipe: raw text -> token shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="clean, filter, deduplicate and tokenize text into shards",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Stages: score, domain, clean-up, quality, exact and near de-duplication, "
                                   "tokenization. docs/data.md explains each rule.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", default=argparse.SUPPRESS,
                   help="JSON Lines / text files, .gz of them, or folders (default: the corpus shipped in the "
                        "package)")
    p.add_argument("--out", required=True, metavar="DIR", default=argparse.SUPPRESS, help="output folder")
    options.add_arguments(p)
    p.add_argument("--force", action="store_true", help="rebuild even if DIR holds finished output (built beside "
                                                        "it, moved in only when complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="print a prepared folder's funnel, shards and unigram entropy (reading every "
                                    "shard, so checking each one's sha256 too)")
    i.add_argument("out", metavar="DIR")
    v = sub.add_parser("verify", help="check every shard's header, size and sha256 against the manifest")
    v.add_argument("out", metavar="DIR")
    return parser


def info(out_dir: str) -> None:
    manifest = read_manifest(out_dir)
    print(funnel_table(manifest))
    for split, sp in manifest["splits"].items():
        for shard in sp["shards"]:
            print(f"  {shard['file']}  {shard['tokens']:,} tokens  sha256 {shard['sha256'][:16]}...")
        if sp["tokens"]:
            nats = unigram_entropy(out_dir, split)  # reads every token: checks the sha256s on the way
            print(f"{split} unigram entropy: {nats:.4f} nats/token ({nats / math.log(2):.4f} bits)")


def verify(out_dir: str) -> None:
    manifest = read_manifest(out_dir)
    for split in manifest["splits"]:
        ds = ShardDataset(out_dir, split)  # headers and sizes
        checked = ds.verify()
        print(f"{split}: {len(ds.shard_files)} shard(s), {ds.num_tokens:,} tokens, {checked:,} bytes: headers, "
              f"sizes and sha256 match {MANIFEST}")
    print(f"{out_dir}: ok")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(getattr(args, "inputs", []), args.out, options.from_arguments(args), force=args.force,
                    progress=False if args.no_progress else None)
        elif args.command == "verify":
            verify(args.out)
        else:
            info(args.out)
    except InputError as e:  # the user's to fix (a missing input is one too): one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command != "prepare":
            print("interrupted", file=sys.stderr)
        elif (Path(args.out) / MANIFEST).is_file():  # a --force rebuild is made beside the finished data
            print(f"interrupted: {args.out} still holds the data it held before; run the same command again to "
                  f"rebuild it", file=sys.stderr)
        else:
            print("interrupted: no manifest was written, so the output folder is marked unfinished; run the same "
                  "command again to rebuild it", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
