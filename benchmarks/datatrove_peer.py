"""Run Hugging Face datatrove (FineWeb's pipeline) on the same inputs as ``gpt2fast.data prepare``, as a peer.

Setup (pinning the installed numpy and torch so that neither moves)::

    pip install datatrove spacy ftfy "xxhash<4" tokenizers \
        "numpy==$(python -c 'import numpy;print(numpy.__version__)')" "torch==2.13.0"

(spacy: datatrove's English word tokenizer, used by the Gopher filters and MinHash, is ``spacy.blank("en")``, which
needs no model download; xxhash: MinHash's default hash; ftfy: the formatter. These are the parts of
``datatrove[processing]`` this pipeline uses.)

Each datatrove stage and what it stands in for in ``gpt2fast.data`` (docs/data.md):

1. ``filter``: JsonlReader (our reader: JSON Lines, gzip, a ``text`` field) -> FTFYFormatter (our **clean**;
   ftfy fixes mojibake/HTML entities/terminal escapes, it does not remove boilerplate lines) -> LambdaFilter
   with our **quality** length and letter thresholds (200..1,000,000 characters, letters >= 0.6 of non-space
   characters) -> GopherRepetitionFilter (our duplicate-line and top-n-gram rules) -> GopherQualityFilter
   (Gopher's word-count/word-length/symbol/stop-word rules; we have no equivalent, FineWeb runs it) ->
   JsonlWriter (uncompressed intermediate; we keep everything in memory) -> ExactDedupSignature (our
   **exact_dedup**, hash of the text).
2. ``exact_find``: ExactFindDedups.  3. ``minhash_signature``: JsonlReader -> ExactDedupFilter -> JsonlWriter ->
   MinhashDedupSignature (our **near_dedup**; datatrove's default MinhashConfig: 5-gram words, 14 buckets x 8
   hashes, xxhash 64 bit, i.e. 112 hashes and an LSH threshold of ~0.72 vs our 128 permutations, 0.8).
4. ``minhash_buckets``: MinhashDedupBuckets.  5. ``minhash_cluster``: MinhashDedupCluster.
6. ``tokenize``: JsonlReader -> MinhashDedupFilter -> DocumentTokenizer (our **tokenize**: GPT-2 BPE built from
   the local vocab in /work/shared/data/gpt2, ``<|endoftext|>`` after each document where we put it before: the
   same token count; uint16 ``.ds`` token files; document shuffling off, as we do not shuffle).

Left out: our **score** and **domain** stages (the corpus has no scores or URLs) and the train/val split.
Nothing needs the network (HF_HUB_OFFLINE=1 is set), so no datatrove stage is left out for being online.

``seconds`` is the wall time of all six executor runs, intermediate files included. ``workers`` is the number of
tasks and worker processes of the per-document stages (the bucket stage runs 14 tasks on ``workers`` processes,
the two finder/cluster stages one task).

    python benchmarks/datatrove_peer.py /work/shared/data/corpus/*.jsonl.gz --workers 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import time

GPT2_DIR = pathlib.Path(os.environ.get("GPT2FAST_GPT2_DIR",
                                     pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2"))
NEEDED = ("datatrove", "spacy", "ftfy", "xxhash", "tokenizers", "orjson")
LEFT_OUT = ["score filter (no scores in the inputs)", "domain filter (no URLs)", "train/val split"]


def available() -> bool:
    """datatrove and what this pipeline needs are importable, and the local GPT-2 vocabulary is there."""
    if not all(importlib.util.find_spec(m) is not None for m in NEEDED):
        return False
    return (GPT2_DIR / "encoder.json").is_file() and (GPT2_DIR / "vocab.bpe").is_file()


def gpt2_tokenizer_json(path: pathlib.Path) -> pathlib.Path:
    """Write GPT-2's byte-level BPE (from encoder.json + vocab.bpe) as a `tokenizers` tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(str(GPT2_DIR / "encoder.json"), str(GPT2_DIR / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    assert tok.token_to_id("<|endoftext|>") == 50256
    tok.save(str(path))
    return path


def _text(doc) -> str:  # ExactDedupConfig's content_getter (it reads the return annotation)
    return doc.text


def _length_and_letters(doc) -> bool:
    text = doc.text
    if not 200 <= len(text) <= 1_000_000:
        return False
    non_space = sum(not c.isspace() for c in text)
    return non_space > 0 and sum(c.isalpha() for c in text) >= 0.6 * non_space


def _ascii(step_name: str) -> str:  # "🔻 - FILTER: 🥇 Gopher Quality" -> "Gopher Quality"
    return step_name.split(":")[-1].encode("ascii", "ignore").decode().strip()


def _count(stats, step: str, key: str) -> int | None:
    """The merged count ``key`` of the first step whose name contains ``step`` (case-insensitive)."""
    for s in stats.stats:
        if step.lower() in s.name.lower() and key in s.stats:
            return int(s.stats[key].total)
    return None


def run_datatrove(inputs: list[pathlib.Path], workdir: pathlib.Path, workers: int = 1) -> dict:
    """Run the comparable pipeline; return {"seconds": float (wall time of the whole pipeline, all stages),
    "docs_in": int, "docs_out": int, "tokens": int or None, "stages": {name: seconds},
    "dropped": {step: documents}, "workers": int, "left_out": [...]}.

    Everything goes under ``workdir/datatrove`` (removed first, so a re-run is not skipped as complete)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter, LambdaFilter
    from datatrove.pipeline.formatters import FTFYFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter

    root = pathlib.Path(workdir) / "datatrove"
    shutil.rmtree(root, ignore_errors=True)
    (root / "input").mkdir(parents=True)
    for i, p in enumerate(inputs):  # one folder for JsonlReader; each task reads files[rank::tasks]
        (root / "input" / f"{i:04d}_{pathlib.Path(p).name}").symlink_to(pathlib.Path(p).resolve())
    tokenizer = str(gpt2_tokenizer_json(root / "gpt2_tokenizer.json"))
    d = {name: str(root / name) for name in ("filtered", "exact_sigs", "exact_dups", "deduped", "mh_sigs",
                                               "mh_buckets", "mh_remove", "tokens", "logs")}
    exact_cfg = ExactDedupConfig(content_getter=_text)
    mh_cfg = MinhashConfig()

    def reader(folder: str) -> JsonlReader:
        return JsonlReader(folder, glob_pattern="*.jsonl*")

    stages = {  # name: (pipeline, tasks)
        "filter": ([
            JsonlReader(str(root / "input")), FTFYFormatter(), LambdaFilter(_length_and_letters),
            GopherRepetitionFilter(), GopherQualityFilter(),
            JsonlWriter(d["filtered"], compression=None), ExactDedupSignature(d["exact_sigs"], exact_cfg),
        ], workers),
        "exact_find": ([ExactFindDedups(d["exact_sigs"], d["exact_dups"], exact_cfg)], 1),
        "minhash_signature": ([
            reader(d["filtered"]), ExactDedupFilter(d["exact_dups"], exact_cfg),
            JsonlWriter(d["deduped"], compression=None), MinhashDedupSignature(d["mh_sigs"], config=mh_cfg),
        ], workers),
        "minhash_buckets": ([MinhashDedupBuckets(d["mh_sigs"], d["mh_buckets"], config=mh_cfg)], mh_cfg.num_buckets),
        "minhash_cluster": ([MinhashDedupCluster(d["mh_buckets"], d["mh_remove"], config=mh_cfg)], 1),
        "tokenize": ([
            reader(d["deduped"]), MinhashDedupFilter(d["mh_remove"]),
            DocumentTokenizer(d["tokens"], tokenizer_name_or_path=tokenizer, eos_token="<|endoftext|>",
                              shuffle_documents=False),
        ], workers),
    }
    times, stats = {}, {}
    t0 = time.perf_counter()
    for name, (pipeline, tasks) in stages.items():
        t = time.perf_counter()
        logs = f"{d['logs']}/{name}"
        stats[name] = LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(tasks, workers), logging_dir=logs).run()
        times[name] = time.perf_counter() - t
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "docs_in": _count(stats["filter"], "jsonl", "documents"),
        "docs_out": _count(stats["tokenize"], "minhash", "forwarded"),
        "tokens": _count(stats["tokenize"], "", "tokens"),  # <|endoftext|> included, one per document
        "stages": times,
        "dropped": {_ascii(s.name): int(s.stats["dropped"].total) for st in stats.values() for s in st.stats
                    if "dropped" in s.stats},  # per filter step
        "workers": workers,
        "left_out": LEFT_OUT,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", type=pathlib.Path)
    ap.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/datatrove_peer"))
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    if not available():
        raise SystemExit("datatrove peer unavailable: pip install " + " ".join(NEEDED))
    print(json.dumps(run_datatrove(args.inputs, args.workdir, args.workers), indent=2))


if __name__ == "__main__":
    main()
