"""``prepare``: raw text through the stages of docs/data.md into a folder of shards, with its manifest and funnel.

Three passes (``_run_stages``): the per-document work on chunks of the streamed input, in parallel; the dedup
decisions, in input order; the kept documents' tokens into the shards, in order. So the output does not depend
on the number of workers or the engine, and memory grows only by a few bytes per document. The output folder
is only ever finished (a manifest, written last) or visibly unfinished (none), so a crash never leaves data
that looks whole. A
``--force`` rebuild of a finished folder is made beside it and moved in only once complete, so a failed
rebuild costs nothing. An input record that cannot be read costs only itself (counted, reported, skipped)
unless ``strict``.

(Not named ``prepare.py``: ``gpt2fast.data.prepare`` is this module's function, and a submodule of the same
name would be shadowed by it in the package.)"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from gpt2fast._io import fsync_dir, write_atomic
from gpt2fast.data.dedup import first_occurrences, greedy_drops, lsh_params
from gpt2fast.data.engine import default_workers, make_engine
from gpt2fast.data.funnel import funnel_plot_png, funnel_table
from gpt2fast.data.options import PrepareOptions
from gpt2fast.data.shards import (
    FUNNEL_PNG,
    HEADER_BYTES,
    MANIFEST,
    MANIFEST_FORMAT,
    SHARD_MAGIC,
    SHARD_VERSION,
    SPLITS,
    PathLike,
    ShardError,
    ShardWriter,
    check_vocabulary,
    read_manifest,
    read_shard_header,
    rebuild_dir,
)
from gpt2fast.data.work import (
    ENTRIES_PER_PARTITION,
    WORK_DIR,
    ChunkReader,
    Context,
    check_eot,
    dedup_partition,
    map_chunk,
    save_index,
)
from gpt2fast.errors import DataError
from gpt2fast.textio import BadRecord, default_corpus_path, iter_files, iter_records

_MAX_WARNINGS = 20  # unreadable records reported one by one; the rest only in the summary and the manifest
_MAX_LINES = 100  # line numbers of unreadable records the manifest lists per file (it counts them all)


def prepare(inputs: Sequence[PathLike] = (), out_dir: PathLike = "data", options: Optional[PrepareOptions] = None,
            *, force: bool = False, tokenizer=None, log: Callable[[str], None] = print,
            progress: Optional[bool] = None) -> dict:
    """Run the pipeline (docs/data.md) from ``inputs`` into ``out_dir``; returns the manifest.

    With no ``inputs``, the small corpus shipped in the package. ``progress``: a progress bar on stderr
    (default: when stderr is a terminal)."""
    options = options or PrepareOptions()
    if tokenizer is None:
        from gpt2fast.tokenizer import Tokenizer

        tokenizer = Tokenizer.gpt2()
    check_vocabulary(tokenizer)
    inputs = [Path(p) for p in inputs] or [default_corpus_path()]
    if not str(out_dir).strip():  # Path("") is the current folder: an unset variable, not a choice
        raise DataError("--out is empty; give the folder to write the shards to")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, inputs)
    input_files = _describe_inputs(inputs)
    out_options = options.output_options()
    fingerprint = _fingerprint(out_options, input_files, tokenizer)

    _make_folder(out_dir)
    _settle_rebuild(out_dir, log)
    rebuilding = (out_dir / MANIFEST).exists()
    if rebuilding:
        if not force:
            old = _finished_like_this(out_dir, fingerprint, out_options, input_files, tokenizer)
            if options.strict:
                _refuse_skipped_records(out_dir, old)
            log(f"{out_dir} is already prepared with these options and inputs; nothing to do (--force rebuilds "
                f"it)")
            return old
        folder = _start_rebuild(out_dir)  # the finished data stays in place until the new is complete
    else:
        _clear(out_dir, log)
        folder = out_dir
    started = time.perf_counter()
    try:
        manifest = _build(inputs, folder, options, tokenizer, progress, fingerprint=fingerprint,
                          out_options=out_options, input_files=input_files)
    except BaseException:
        if rebuilding:  # the finished data was never touched; nothing of this run stays
            _remove_rebuild(folder)
        raise
    if rebuilding:
        _move_in(folder, out_dir)
    log(funnel_table(manifest))
    seconds = time.perf_counter() - started
    mb = manifest["stages"][0]["bytes_in"] / 1e6
    log(f"prepared {mb:,.1f} MB in {seconds:.1f} s ({mb / max(seconds, 1e-9):.2f} MB/s; {options.engine} engine, "
        f"{options.workers or default_workers()} worker(s))")
    log(f"wrote {sum(len(v['shards']) for v in manifest['splits'].values())} shard(s), {FUNNEL_PNG} and {MANIFEST} "
        f"to {out_dir}")
    _summarize_unreadable(manifest)
    return manifest


def _build(inputs: Sequence[Path], folder: Path, options: PrepareOptions, tokenizer, progress: Optional[bool], *,
           fingerprint: str, out_options: dict, input_files: List[dict]) -> dict:
    """Run the stages into ``folder`` (empty of our files) and write its funnel and manifest, last."""
    check_eot(tokenizer)
    writers = {s: ShardWriter(folder, s, options.shard_tokens) for s in SPLITS}
    try:
        stages, unreadable = _run_stages(inputs, options, tokenizer, writers, progress, folder)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise

    manifest = {
        "format": MANIFEST_FORMAT,
        "shard_version": SHARD_VERSION,
        "shard_header": {"bytes": HEADER_BYTES, "magic": SHARD_MAGIC, "layout": "<int32 magic, int32 version, "
                                                                                "int64 tokens>, zeros"},
        "dtype": "uint16",
        "fingerprint": fingerprint,
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.n_vocab, "eot_token": tokenizer.eot_token},
        "options": out_options,
        "inputs": input_files,
        "stages": [s.as_dict() for s in stages],
        "unreadable": unreadable.as_dict(),
        "splits": {s: {"documents": w.documents, "tokens": w.tokens, "max_token": w.max_token,
                       "shards": w.shards} for s, w in writers.items()},
        "funnel_plot": FUNNEL_PNG,
    }
    write_atomic(folder / FUNNEL_PNG, funnel_plot_png(manifest))
    write_atomic(folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))  # last: finished
    return manifest


# ---------------------------------------------------------------------------------------- the output folder
def _check_out_dir(out_dir: Path, inputs: List[Path]) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} is a file; give a folder")
    blocking = next((p for p in out_dir.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise DataError(f"--out {out_dir} cannot be created: {blocking} is a file; give a folder elsewhere")
    for p in inputs:
        if p.is_dir() and (out_dir.resolve() == p.resolve() or p.resolve() in out_dir.resolve().parents):
            raise DataError(f"--out {out_dir} is inside the input folder {p}, whose files would be read as input "
                            f"on the next run; choose an output folder outside it")


def _describe_inputs(inputs: Sequence[PathLike]) -> List[dict]:
    files = []
    for f in iter_files(inputs):
        st = f.stat()
        files.append({"path": str(f.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    if not files:
        raise DataError(f"no input files found in {[str(p) for p in inputs]} (folders are searched for "
                        f".txt, .jsonl, .json, .md and their .gz)")
    return files


def _fingerprint(options: dict, inputs: List[dict], tokenizer) -> str:
    blob = json.dumps({"format": MANIFEST_FORMAT, "shard_version": SHARD_VERSION, "options": options,
                       "inputs": inputs, "tokenizer": [tokenizer.name, tokenizer.n_vocab]}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _finished_like_this(out_dir: Path, fingerprint: str, out_options: dict, input_files: List[dict],
                        tokenizer) -> dict:
    """The manifest of a finished ``out_dir`` made with these options and inputs (a re-run is then a no-op);
    a DataError saying what differs, or what is damaged, otherwise."""
    old = read_manifest(out_dir)
    if old.get("fingerprint") == fingerprint:
        damage = _damage(out_dir, old)
        if damage:
            raise DataError(f"{out_dir} was prepared with these options but is damaged ({damage}); "
                            f"pass --force to rebuild it")
        return old
    diffs = [f"options.{k}: {a!r} -> {b!r}" for k, a, b in _differences(old.get("options", {}), out_options)]
    if old.get("inputs") != input_files:
        diffs.append("inputs (files, sizes or modification times)")
    if old.get("tokenizer", {}).get("name") != tokenizer.name:
        diffs.append(f"tokenizer: {old.get('tokenizer', {}).get('name')!r} -> {tokenizer.name!r}")
    raise DataError(f"{out_dir} already holds data prepared differently ({'; '.join(diffs) or 'format'}); "
                    f"pass --force to rebuild it, or choose another --out")


def _damage(out_dir: Path, manifest: dict) -> Optional[str]:
    """What is wrong with a finished output folder (cheap checks: files, sizes, headers), or None."""
    for split in manifest.get("splits", {}).values():
        for shard in split["shards"]:
            try:
                if read_shard_header(out_dir / shard["file"]) != shard["tokens"]:
                    return f"{shard['file']} holds another token count than the manifest says"
            except ShardError as e:
                return str(e)
    return None


def _differences(old: dict, new: dict) -> List[Tuple[str, object, object]]:
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


_OUR_FILES = re.compile("|".join([
    r"(train|val)_\d{6}\.bin",
    r"\.(train|val)_\d{6}\.bin\.tmp",  # a shard being written (ShardWriter)
    re.escape(MANIFEST), re.escape(FUNNEL_PNG),
    rf"\.({re.escape(MANIFEST)}|{re.escape(FUNNEL_PNG)})\..*\.tmp",  # write_atomic's temporary files
]))


def _our_files(out_dir: Path) -> List[Path]:
    """What a run of ``prepare`` writes into ``out_dir`` (and nothing else there)."""
    return sorted(p for p in out_dir.iterdir() if _OUR_FILES.fullmatch(p.name))


def _make_folder(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create --out {out_dir}: {e.strerror or e}; give a folder you can write to") from None


def _clear(out_dir: Path, log: Callable[[str], None]) -> None:
    """Remove what an earlier run left, manifest first, so the folder never looks finished while we rebuild."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    leftovers = _our_files(out_dir)
    for p in leftovers:
        p.unlink()
    if (out_dir / WORK_DIR).is_dir():
        shutil.rmtree(out_dir / WORK_DIR)
        leftovers.append(out_dir / WORK_DIR)
    if leftovers:
        log(f"removed {len(leftovers)} file(s) left in {out_dir} by an unfinished run; rebuilding")


# A --force rebuild of a finished folder D is made in rebuild_dir(D), a sibling, and then moved in: D's manifest
# goes first (D is unfinished from then on), D's old shards go, the new files are renamed in and the new manifest
# comes last. Files into D one by one, rather than swapping whole folders, so that files in D that are not
# ours, D's own permissions, and a D that is a mount point all stay as they were. A run that finds the rebuild
# folder finishes that move if it had begun (the rebuild is complete and D has no manifest), and otherwise
# removes it: D is then still the old, finished data.
def _start_rebuild(out_dir: Path) -> Path:
    folder = rebuild_dir(out_dir)
    try:
        folder.mkdir()
    except OSError as e:
        raise DataError(f"cannot create {folder} to rebuild {out_dir} in ({e.strerror or e}): --force builds the "
                        f"new data beside the old and moves it in only when complete; make {folder.parent} "
                        f"writable, or delete {out_dir / MANIFEST} to rebuild in place (the old data is then "
                        f"lost)") from None
    return folder


def _settle_rebuild(out_dir: Path, log: Callable[[str], None]) -> None:
    """Finish or remove what an interrupted --force rebuild of ``out_dir`` left beside it."""
    folder = rebuild_dir(out_dir)
    if not folder.is_dir():
        return
    if (folder / MANIFEST).is_file() and not (out_dir / MANIFEST).exists():
        log(f"finishing the --force rebuild of {out_dir}, interrupted while its files were moved in")
        _move_in(folder, out_dir)
    elif _remove_rebuild(folder):
        log(f"removed {folder}, left by an interrupted --force rebuild ({out_dir} is as it was before it)")
    else:
        raise DataError(f"{folder} (where --force rebuilds {out_dir}) holds files that prepare did not write; "
                        f"move them elsewhere and run again")


def _remove_rebuild(folder: Path) -> bool:
    """Delete the rebuild folder's files (only ours) and the folder; whether it is gone."""
    for p in _our_files(folder):
        p.unlink(missing_ok=True)
    shutil.rmtree(folder / WORK_DIR, ignore_errors=True)
    try:
        folder.rmdir()
    except OSError:
        return False
    return True


def _move_in(folder: Path, out_dir: Path) -> None:
    """Replace the data in ``out_dir`` by the complete data in the rebuild ``folder``; re-entrant, so a run that
    finds it interrupted can finish it."""
    new = read_manifest(folder)
    files = {s["file"] for sp in new["splits"].values() for s in sp["shards"]} | {FUNNEL_PNG}
    (out_dir / MANIFEST).unlink(missing_ok=True)  # from here out_dir is unfinished: the next run finishes this
    fsync_dir(out_dir)
    for p in _our_files(out_dir):
        if p.name not in files:
            p.unlink()
    for name in sorted(files):
        if (folder / name).exists():  # the rest were moved in before an interruption
            os.replace(folder / name, out_dir / name)
    fsync_dir(out_dir)
    damage = _damage(out_dir, new)
    if damage:
        _remove_rebuild(folder)
        raise DataError(f"the rebuilt data could not be moved into {out_dir} ({damage}); run prepare again to "
                        f"rebuild it")
    os.replace(folder / MANIFEST, out_dir / MANIFEST)  # last: out_dir is finished again, with the new data
    fsync_dir(out_dir)
    _remove_rebuild(folder)


# ---------------------------------------------------------------------------------------- the stages
@dataclasses.dataclass
class _Stage:
    """One row of the funnel: documents and UTF-8 bytes in and out, and why documents were dropped."""
    name: str
    label: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped_by: Dict[str, int] = dataclasses.field(default_factory=dict)
    extra: Dict[str, int] = dataclasses.field(default_factory=dict)  # stage-specific counts for the manifest

    def keep(self, nbytes_in: int, nbytes_out: int) -> None:
        self.docs_in += 1
        self.bytes_in += nbytes_in
        self.docs_out += 1
        self.bytes_out += nbytes_out

    def drop(self, nbytes_in: int, reason: str) -> None:
        self.docs_in += 1
        self.bytes_in += nbytes_in
        self.dropped_by[reason] = self.dropped_by.get(reason, 0) + 1

    def as_dict(self) -> dict:
        d = {"name": self.name, "label": self.label, "docs_in": self.docs_in, "docs_out": self.docs_out,
             "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
             "dropped_by": dict(sorted(self.dropped_by.items()))}
        d.update(self.extra)
        return d


def _stages(opts: PrepareOptions) -> Dict[str, _Stage]:
    domains = opts.exclude_domains
    stages = [
        _Stage("input", "input documents"),
        _Stage("score", f"quality score >= {opts.min_score:g}" if opts.min_score is not None
               else "quality score (off)"),
        _Stage("domain", f"domain not {', '.join(domains)}" if domains else "domain (off)"),
        _Stage("clean", "clean-up (NFC, whitespace, boilerplate)", extra={"boilerplate_lines_removed": 0}),
        _Stage("quality", "quality heuristics"),
        _Stage("exact_dedup", "exact de-duplication"),
        _Stage("near_dedup", f"near-duplicates (MinHash LSH, verified J >= {opts.near_dup_threshold:g})"
               if opts.near_dedup else "near-duplicates (off)"),
        _Stage("tokenize", "tokenized (GPT-2 BPE)", extra={"tokens": 0}),
    ]
    return {s.name: s for s in stages}


def split_draw(seed: int, digest: bytes) -> float:
    """A number in [0, 1) from (seed, the text's hash): the same document always lands in the same split."""
    h = hashlib.blake2b(digest, digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little") / 2.0 ** 64


class _Splitter:
    """Sends each tokenized document to train or val, and keeps val from ending up empty.

    A document goes to val when its draw (``split_draw``) is below ``val_fraction``. While val has no document
    yet, the train document with the smallest draw so far is not written but held: it is released to train as
    soon as a real val document arrives (or a smaller draw replaces it), and if none ever does, ``finish``
    makes it val's one document (given a second document for train). So the split depends on neither the order
    nor the batching, and only one document's tokens are ever held in memory."""

    def __init__(self, writers: Dict[str, ShardWriter], val_fraction: float, seed: int):
        self.writers, self.val_fraction, self.seed = writers, val_fraction, seed
        self.held: Optional[Tuple[float, np.ndarray]] = None  # (draw, tokens)
        self._batch: Dict[str, List[np.ndarray]] = {s: [] for s in SPLITS}  # written together by flush()

    def _val_is_empty(self) -> bool:
        return self.writers["val"].documents == 0 and not self._batch["val"]

    def add(self, tokens: np.ndarray, digest: bytes) -> None:
        draw = split_draw(self.seed, digest)
        if draw < self.val_fraction:
            if self.held is not None:  # val is no longer empty: the held document is train's after all
                self._batch["train"].append(self.held[1])
                self.held = None
            self._batch["val"].append(tokens)
            return
        if self.val_fraction > 0 and self._val_is_empty() and (self.held is None or draw < self.held[0]):
            previous, self.held = self.held, (draw, tokens)
            if previous is None:
                return
            tokens = previous[1]  # the one it replaces goes to train in its place
        self._batch["train"].append(tokens)

    def flush(self) -> None:
        for s in SPLITS:
            if self._batch[s]:
                self.writers[s].write(np.concatenate(self._batch[s]), len(self._batch[s]))
                self._batch[s] = []

    def finish(self) -> None:
        self.flush()
        if self.held is not None:
            to_val = self.writers["val"].documents == 0 and self.writers["train"].documents > 0
            self.writers["val" if to_val else "train"].write(self.held[1], 1)
            self.held = None


class _Unreadable:
    """The input records that could not be read: each counted as dropped by the input stage (by reason), by
    file for the manifest, and reported with its file and line (the first ``_MAX_WARNINGS`` one by one); with
    ``strict``, the first one is a DataError instead."""

    def __init__(self, strict: bool, stage: _Stage):
        self.strict, self.stage = strict, stage
        self.records = 0
        self.files: Dict[str, dict] = {}  # resolved path -> its counts, in the order the files were read

    def __call__(self, bad: BadRecord) -> None:
        if self.strict:
            raise DataError(f"{bad}; {bad.fix}, or run without --strict to skip and count such records")
        self.records += 1
        self.stage.drop(bad.nbytes, bad.reason)
        entry = self.files.setdefault(str(bad.path.resolve()), {"records": 0, "by_reason": {}, "lines": []})
        entry["records"] += 1
        entry["by_reason"][bad.reason] = entry["by_reason"].get(bad.reason, 0) + 1
        if bad.rest_lost:
            entry["rest_lost_after_line"] = (bad.line or 1) - 1
        elif bad.line is not None and len(entry["lines"]) < _MAX_LINES:
            entry["lines"].append(bad.line)
        if self.records <= _MAX_WARNINGS:
            print(f"warning: {bad}; skipped", file=sys.stderr)
        elif self.records == _MAX_WARNINGS + 1:
            print(f"warning: more unreadable records than {_MAX_WARNINGS}: the rest are only counted (the summary "
                  f"at the end, and {MANIFEST}'s \"unreadable\", list them by file)", file=sys.stderr)

    def as_dict(self) -> dict:
        by_reason: Dict[str, int] = {}
        for entry in self.files.values():
            for reason, n in entry["by_reason"].items():
                by_reason[reason] = by_reason.get(reason, 0) + n
        return {"records": self.records, "by_reason": dict(sorted(by_reason.items())),
                "files": [{"path": path, **entry, "by_reason": dict(sorted(entry["by_reason"].items()))}
                          for path, entry in self.files.items()]}


def _summarize_unreadable(manifest: dict) -> None:
    unreadable = manifest["unreadable"]
    if unreadable["records"]:
        why = ", ".join(f"{k} {v:,}" for k, v in unreadable["by_reason"].items())
        print(f"warning: skipped {unreadable['records']:,} unreadable input record(s) in "
              f"{len(unreadable['files'])} file(s) ({why}); {MANIFEST}'s \"unreadable\" lists them by file, and "
              f"--strict stops at the first instead", file=sys.stderr)


def _refuse_skipped_records(out_dir: Path, manifest: dict) -> None:
    """--strict on a folder already prepared from these inputs: an error if that run skipped records."""
    unreadable = manifest.get("unreadable") or {}
    if unreadable.get("records"):
        first = unreadable["files"][0]
        where = first["path"] + (f":{first['lines'][0]}" if first.get("lines") else "")
        raise DataError(f"{out_dir} was prepared from these inputs by skipping {unreadable['records']:,} unreadable "
                        f"record(s) (the first at {where}), which --strict refuses; fix those inputs ({MANIFEST}'s "
                        f"\"unreadable\" lists them by file), or run without --strict")


def _run_stages(inputs: Sequence[Path], opts: PrepareOptions, tokenizer, writers: Dict[str, ShardWriter],
                progress: Optional[bool], folder: Path) -> Tuple[List[_Stage], _Unreadable]:
    """Three passes: the per-document stages on chunks of the input, in parallel (``work.map_chunk``); the
    dedup decisions, near-dedup in parallel partitions (``work.dedup_partition``) merged in input order; then
    the kept documents' tokens into the shards, in input order."""
    stages = _stages(opts)
    unreadable = _Unreadable(opts.strict, stages["input"])
    show = progress or (progress is None and sys.stderr.isatty())
    work_dir = folder / WORK_DIR
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir()
    engine = None
    try:
        engine = make_engine(opts.engine, Context(opts, tokenizer, work_dir), opts.workers)
        chunks = _map_phase(engine, iter_records(inputs, on_bad=unreadable), opts, stages, show)
        drops = _dedup_phase(engine, chunks, opts, stages, work_dir, show)
        _write_phase(chunks, drops, opts, stages, writers, work_dir, show)
    finally:
        if engine is not None:
            engine.close()
        shutil.rmtree(work_dir, ignore_errors=True)
    if opts.val_fraction > 0 and writers["val"].documents == 0 and stages["tokenize"].docs_out:
        print(f"warning: only {stages['tokenize'].docs_out} document kept, so the val split is empty",
              file=sys.stderr)
    return list(stages.values()), unreadable


class _Chunk(NamedTuple):
    """What the driver keeps of a mapped chunk: for each of its documents that passed the quality rules, the
    global index, cleaned size, text hash and shingle-set digest."""
    index: int
    start: int
    docs: np.ndarray
    nbytes: np.ndarray
    digests: np.ndarray
    set_digests: np.ndarray


MAX_DOCUMENTS = (1 << 32) - 1


def _chunk_jobs(records, opts: PrepareOptions, starts: List[int]):
    """(chunk index, records) jobs of at most ``batch_docs`` documents or ``batch_chars`` characters (a
    document larger than that is a chunk of its own); ``starts`` gets each chunk's first global index."""
    batch, chars, n = [], 0, 0
    for rec in records:
        batch.append((rec.text, rec.url, rec.score))
        chars += len(rec.text)
        if n + len(batch) > MAX_DOCUMENTS:
            raise DataError(f"more than {MAX_DOCUMENTS:,} input documents in one run (dedup numbers them in 32 "
                            f"bits); prepare the inputs in parts of fewer documents, each into its own --out")
        if len(batch) >= opts.batch_docs or chars >= opts.batch_chars:
            starts.append(n)
            n += len(batch)
            yield len(starts) - 1, batch
            batch, chars = [], 0
    if batch:
        starts.append(n)
        yield len(starts) - 1, batch


def _add_counts(stage: _Stage, counts: dict) -> None:
    stage.docs_in += counts["docs_in"]
    stage.docs_out += counts["docs_out"]
    stage.bytes_in += counts["bytes_in"]
    stage.bytes_out += counts["bytes_out"]
    for k, v in counts["dropped_by"].items():
        stage.dropped_by[k] = stage.dropped_by.get(k, 0) + v
    for k, v in counts["extra"].items():
        stage.extra[k] = stage.extra.get(k, 0) + v


def _map_phase(engine, records, opts: PrepareOptions, stages: Dict[str, _Stage], show: bool) -> List[_Chunk]:
    starts: List[int] = []
    chunks = []
    bar = _bar(show, "filter, hash, tokenize", " docs")
    started = time.perf_counter()
    try:
        for result in engine.map(map_chunk, _chunk_jobs(records, opts, starts)):
            c = result["chunk"]
            for name, counts in result["stages"].items():
                _add_counts(stages[name], counts)
            chunks.append(_Chunk(c, starts[c], (starts[c] + result["rows"]).astype(np.uint32),
                                 result["nbytes"].astype(np.uint32), result["digests"], result["set_digests"]))
            if bar is not None:
                bar.update(result["records"])
                mb = stages["input"].bytes_in / 1e6
                bar.set_postfix_str(f"{mb:,.0f} MB, {mb / max(time.perf_counter() - started, 1e-9):.1f} MB/s, "
                                    f"{engine.workers} worker(s)")
    finally:
        if bar is not None:
            bar.close()
    return chunks


class _Drops(NamedTuple):
    exact: np.ndarray  # per quality-passing document, in order: an exact duplicate
    near: np.ndarray  # a near-duplicate


def _dedup_phase(engine, chunks: List[_Chunk], opts: PrepareOptions, stages: Dict[str, _Stage], work_dir: Path,
                 show: bool) -> _Drops:
    n = sum(len(c.docs) for c in chunks)
    exact = ~first_occurrences(np.concatenate([c.digests for c in chunks]) if chunks else np.zeros(0, np.uint64))
    near = np.zeros(n, bool)
    if not opts.near_dedup or not n:
        return _Drops(exact, near)
    docs = np.concatenate([c.docs for c in chunks])  # increasing
    bands, rows = lsh_params(opts.near_dup_threshold)
    set_digests = np.concatenate([c.set_digests for c in chunks])
    candidates = np.flatnonzero(~exact & (set_digests != 0))  # documents without shingles are never near-dups
    firsts = first_occurrences(set_digests[candidates])
    near[candidates[~firsts]] = True  # the same shingle set as an earlier candidate: Jaccard 1 (docs/data.md)
    eligible = np.zeros(n, bool)
    eligible[candidates[firsts]] = True
    del set_digests, candidates
    chunk_rows = np.zeros(len(chunks) + 1, np.int64)
    np.cumsum([len(c.docs) for c in chunks], out=chunk_rows[1:])
    save_index(work_dir, chunk_rows, eligible, docs)
    same_shingle_set = int((~firsts).sum())
    del docs, firsts
    parts = max(1, -(-int(eligible.sum()) // ENTRIES_PER_PARTITION))
    jobs = [(band, part, parts) for band in range(bands) for part in range(parts)]
    bar = _bar(show, "near-dedup partitions", " partitions", total=len(jobs))
    found, candidate_pairs = [], 0
    try:
        for pairs, n_candidates in engine.map(dedup_partition, jobs):
            found.append(pairs)
            candidate_pairs += n_candidates
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    edges = np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), np.int64)
    dropped = np.array(sorted(greedy_drops(edges)), np.int64)
    if len(dropped):
        docs = np.load(work_dir / "index-global.npy", mmap_mode="r", allow_pickle=False)
        near[np.searchsorted(docs, dropped)] = True
    extra = stages["near_dedup"].extra
    extra.update({"lsh_bands": bands, "lsh_rows": rows,
                  "same_shingle_set": same_shingle_set, "candidate_pairs": candidate_pairs,
                  "verified_pairs": len(edges)})
    return _Drops(exact, near)


def _write_phase(chunks: List[_Chunk], drops: _Drops, opts: PrepareOptions, stages: Dict[str, _Stage],
                 writers: Dict[str, ShardWriter], work_dir: Path, show: bool) -> None:
    splitter = _Splitter(writers, opts.val_fraction, opts.seed)
    reader = ChunkReader(work_dir)
    ex, nd, tk = stages["exact_dedup"], stages["near_dedup"], stages["tokenize"]
    bar = _bar(show, "write shards", " docs", total=sum(len(c.docs) for c in chunks))
    row = 0
    try:
        for c in chunks:
            tokens = reader.array(c.index, "tokens")
            offsets = reader.array(c.index, "tokens-offsets")
            for r, (size, digest) in enumerate(zip(c.nbytes.tolist(), c.digests.tolist())):
                if drops.exact[row + r]:
                    ex.drop(size, "duplicate")
                    continue
                ex.keep(size, size)
                if drops.near[row + r]:
                    nd.drop(size, "near_duplicate")
                    continue
                nd.keep(size, size)
                doc = np.array(tokens[offsets[r]:offsets[r + 1]])
                tk.keep(size, size)
                tk.extra["tokens"] += len(doc)
                splitter.add(doc, digest.to_bytes(8, "little"))
            splitter.flush()
            row += len(c.docs)
            if bar is not None:
                bar.update(len(c.docs))
    finally:
        if bar is not None:
            bar.close()
    splitter.finish()


def _bar(show: bool, desc: str, unit: str, total: Optional[int] = None):
    if not show:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, mininterval=0.5)
