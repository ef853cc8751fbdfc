"""The data pipeline: raw text -> cleaned, deduplicated, tokenized shards (GPT-2's WebText recipe), and the
loader the trainer reads them with. docs/data.md is the user's guide; ``python -m gpt2fast.data --help``.

One module per job: ``shards`` (the folder format, its writer and readers), ``clean`` (clean-up, quality
rules), ``dedup`` (exact and MinHash, in mergeable pieces), ``work`` (what a worker does with a chunk or a
dedup partition), ``engine`` (local processes or Ray), ``pipeline`` (``prepare``: the passes, the decisions,
the manifest), ``funnel`` (its table and plot), ``options`` (``PrepareOptions``, from which the CLI is built),
``loader`` (``TokenLoader``), ``__main__`` (the CLI). Importing this package is cheap: rensa, matplotlib and
torch load on first use."""
from gpt2fast.data.clean import (
    BOILERPLATE_LINES,
    BOILERPLATE_PATTERNS,
    Words,
    clean_text,
    dup_line_share,
    host_excluded,
    is_boilerplate,
    letter_share,
    quality_problem,
    top_ngram_share,
    url_host,
)
from gpt2fast.data.funnel import funnel_plot_png, funnel_table
from gpt2fast.data.loader import TokenLoader, unigram_entropy
from gpt2fast.data.options import PrepareOptions
from gpt2fast.data.pipeline import prepare
from gpt2fast.data.shards import (
    FUNNEL_PNG,
    HEADER_BYTES,
    MANIFEST,
    MANIFEST_FORMAT,
    MAX_VOCAB,
    SHARD_MAGIC,
    SHARD_VERSION,
    SPLITS,
    TOKEN_DTYPE,
    ShardDataset,
    ShardError,
    read_manifest,
    read_shard,
    read_shard_header,
    shard_header,
)
from gpt2fast.errors import ConfigError, DataError


def main(argv=None) -> int:
    """The command line (``gpt2fast.data.__main__``), imported only when called: importing it here would make
    ``python -m gpt2fast.data`` find the module already loaded and warn."""
    from gpt2fast.data.__main__ import main as cli

    return cli(argv)


__all__ = [
    "BOILERPLATE_LINES", "BOILERPLATE_PATTERNS", "FUNNEL_PNG", "HEADER_BYTES", "MANIFEST", "MANIFEST_FORMAT",
    "MAX_VOCAB", "SHARD_MAGIC", "SHARD_VERSION", "SPLITS", "TOKEN_DTYPE", "ConfigError", "DataError",
    "PrepareOptions", "ShardDataset", "ShardError", "TokenLoader", "Words", "clean_text", "dup_line_share",
    "funnel_plot_png", "funnel_table", "host_excluded", "is_boilerplate", "letter_share", "main", "prepare",
    "quality_problem", "read_manifest", "read_shard", "read_shard_header", "shard_header", "top_ngram_share",
    "unigram_entropy", "url_host",
]
