"""Shared fixtures and helpers for the tokenizer benchmarks.

    pytest benchmarks/ --benchmark-only                           # full run: the whole corpus
    GPT2FAST_BENCH_QUICK=1 pytest benchmarks/ --benchmark-disable -q  # CI smoke run, well under a minute

Quick mode (``GPT2FAST_BENCH_QUICK=1``) uses the first ~1 MB of the corpus, trains 256 merges and runs the
pathological inputs only up to 10^5 characters. The corpus is ``../shared/data/corpus/*.jsonl.gz`` seen from
the repository root; without it, the Moby-Dick copy shipped in ``gpt2fast/assets`` stands in.

Every comparison is one pytest-benchmark group holding our implementation ("ours") and a peer ("peer").
The ``measure`` fixture runs a function under the ``benchmark`` fixture, writes MB/s (or MB) into
``benchmark.extra_info`` and records the figure (``bench_results.record``; the GPU suites record theirs
through ``gpu_timing``). At the end of the session ``pytest_terminal_summary`` prints one table for every
suite that ran: benchmark, ours, peer, ratio (> 1: ours is better), goal, met, and for GPU figures the share
of the GPU's peak and of the ceiling measured on the spot; and writes the rows as JSON to
``--gpt2fast-json=PATH``, else ``$GPT2FAST_BENCH_JSON``, else ``.benchmarks/gpt2fast-results.json`` (render
it with ``python -m gpt2fast.bench report PATH``).
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]


def _import_the_installed_package() -> None:
    """After `pip install .` (not -e) the checkout's gpt2fast/ has no compiled _bpe; `python -m pytest` and a
    subprocess started in the checkout would import that copy first and fail. Then the checkout leaves
    sys.path (and the subprocesses' working directory, see rss_of_subprocess), so the installed package is
    the one measured."""
    if any((REPO_ROOT / "gpt2fast").glob("_bpe*")):
        return  # an editable install, or a build in place: the checkout is the package
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != REPO_ROOT]
    for name in [m for m in sys.modules if m == "gpt2fast" or m.startswith("gpt2fast.")]:
        del sys.modules[name]


_import_the_installed_package()

# Figures and rows live in bench_results (shared with the GPU suites' gpu_timing); the row and JSON format,
# and the Markdown/PNG report, in gpt2fast.bench.
import bench_results  # noqa: E402
import pytest  # noqa: E402
from bench_results import NOTES, SESSION, Figure, record  # noqa: E402

from gpt2fast.bench import text_table  # noqa: E402

QUICK = os.environ.get("GPT2FAST_BENCH_QUICK", "") not in ("", "0")

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
CORPUS_DIR = SHARED_DATA / "corpus"

EOT = "<|endoftext|>"
N_CPUS = os.cpu_count() or 1
QUICK_CORPUS_BYTES = 1_000_000
TRAIN_MERGES = 256 if QUICK else 8192
PATHOLOGICAL_SIZES = (10**4, 10**5) if QUICK else (10**4, 10**5, 10**6)
# tiktoken runs the pathological inputs only up to this length. Older tiktoken releases are quadratic on
# one long pre-token piece; tiktoken 0.14 took 0.02 s on 10^5 'a's (and 0.29 s on 10^6) on the dev machine,
# so 10^5 is safe, and the 10^6 case stays ours-only as the brief asks.
PEER_MAX_REPEAT = 10**5


# ------------------------------------------------------------------------------------------- corpus
@dataclass(frozen=True)
class Corpus:
    source: str
    texts: List[str]  # one string per document
    text: str  # all documents concatenated, nothing in between
    nbytes: int  # UTF-8 bytes of ``text`` (the same as of all ``texts`` together)

    def describe(self) -> str:
        return f"{len(self.texts)} documents, {self.nbytes / 1e6:.2f} MB of UTF-8 from {self.source}"


def _read_jsonl_gz(file) -> List[str]:
    with gzip.open(file, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _first_bytes(texts: List[str], budget: int) -> List[str]:
    """The leading documents holding ``budget`` UTF-8 bytes; the last one cut at a character boundary."""
    kept = []
    for text in texts:
        if budget <= 0:
            break
        data = text.encode("utf-8")
        if len(data) > budget:
            text = data[:budget].decode("utf-8", "ignore")
        kept.append(text)
        budget -= len(data)
    return kept


def load_corpus(quick: bool = QUICK) -> Corpus:
    files = sorted(CORPUS_DIR.glob("*.jsonl.gz"))
    if files:
        texts = [text for path in files for text in _read_jsonl_gz(path)]
        source = os.path.relpath(CORPUS_DIR, REPO_ROOT)
    else:
        with (resources.files("gpt2fast") / "assets" / "mobydick.jsonl.gz").open("rb") as raw:
            texts = _read_jsonl_gz(raw)
        source = "gpt2fast/assets/mobydick.jsonl.gz (fallback: shared corpus missing)"
    if quick:
        texts = _first_bytes(texts, QUICK_CORPUS_BYTES)
        source += ", first ~1 MB (quick mode)"
    text = "".join(texts)
    return Corpus(source, texts, text, len(text.encode("utf-8")))


# ---------------------------------------------------------------------------------- implementations
@dataclass(frozen=True)
class Encoder:
    """A GPT-2 encoder under test, behind one interface."""

    name: str
    role: str  # "ours" or "peer"
    encode_ordinary: Callable[[str], list]
    encode_ordinary_batch: Callable[[List[str]], list]  # on all cores
    import_code: str  # for the memory benchmark, run in a fresh interpreter: import the library,
    load_code: str  # then load GPT-2's vocabulary and encode one short string


@dataclass(frozen=True)
class Trainer:
    """A byte-level BPE trainer under test: ``train(texts, vocab_size)`` returns the trained vocabulary size."""

    name: str
    role: str
    train: Callable[[List[str], int], int]


@functools.cache
def _ours_encoder() -> Encoder:
    from gpt2fast import Tokenizer

    tok = Tokenizer.gpt2()
    return Encoder("gpt2fast", "ours", tok.encode_ordinary, tok.encode_ordinary_batch,
                   import_code="import gpt2fast.tokenizer",
                   load_code="tok = gpt2fast.tokenizer.Tokenizer.gpt2(); tok.encode_ordinary('Hello world')")


# tiktoken's GPT-2 encoding built from the vocabulary we ship (no network, no cache): the same ranks and
# pattern as tiktoken.get_encoding("gpt2"), so the peer runs wherever the suite does.
_TIKTOKEN_GPT2 = """
import tiktoken, tiktoken.load
from importlib import resources
_assets = resources.files("gpt2fast") / "assets"
enc = tiktoken.Encoding("gpt2", pat_str={pattern!r},
                        mergeable_ranks=tiktoken.load.data_gym_to_mergeable_bpe_ranks(
                            vocab_bpe_file=str(_assets / "vocab.bpe"), encoder_json_file=str(_assets / "encoder.json")),
                        special_tokens={{"<|endoftext|>": 50256}})
"""
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@functools.cache
def _tiktoken_encoder() -> Encoder:
    pytest.importorskip("tiktoken")
    code = _TIKTOKEN_GPT2.format(pattern=GPT2_PATTERN)
    scope: dict = {}
    exec(code, scope)  # our own source text above: the same lines the memory probe's subprocess runs
    enc = scope["enc"]
    return Encoder("tiktoken", "peer", enc.encode_ordinary,
                   functools.partial(enc.encode_ordinary_batch, num_threads=N_CPUS),
                   import_code="import tiktoken, tiktoken.load",
                   load_code=code + "\nenc.encode_ordinary('Hello world')")


def _ours_trainer() -> Trainer:
    from gpt2fast import Tokenizer

    def train(texts, vocab_size):
        return Tokenizer.train(texts, vocab_size, special_tokens=[EOT]).n_vocab

    return Trainer("gpt2fast", "ours", train)


def _hf_trainer() -> Trainer:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    def train(texts, vocab_size):
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        hf.train_from_iterator(texts, trainer)
        return hf.get_vocab_size()

    return Trainer("hf-tokenizers", "peer", train)


ENCODERS = {"gpt2fast": _ours_encoder, "tiktoken": _tiktoken_encoder}
TRAINERS = {"gpt2fast": _ours_trainer, "hf-tokenizers": _hf_trainer}


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def corpus() -> Corpus:
    loaded = load_corpus()
    SESSION["corpus"] = loaded.describe()
    return loaded


@pytest.fixture
def gpt2_encoder(request) -> Encoder:
    """Each GPT-2 encoder in turn (parametrized in ``pytest_generate_tests``)."""
    return ENCODERS[request.param]()


@pytest.fixture
def ours() -> Encoder:
    return _ours_encoder()


@pytest.fixture(params=list(TRAINERS))
def bpe_trainer(request) -> Trainer:
    return TRAINERS[request.param]()


@pytest.fixture
def train_merges() -> int:
    return TRAIN_MERGES


@pytest.fixture
def pathological_sizes() -> tuple:
    return PATHOLOGICAL_SIZES


def pytest_generate_tests(metafunc):
    """A test taking ``gpt2_encoder`` runs once per encoder; one also taking ``repeat`` runs each encoder on
    each pathological size, the peers only up to ``PEER_MAX_REPEAT``."""
    if "gpt2_encoder" not in metafunc.fixturenames:
        return
    if "repeat" not in metafunc.fixturenames:
        metafunc.parametrize("gpt2_encoder", list(ENCODERS), indirect=True)
        return
    cases = [pytest.param(name, n, id=f"{name}-1e{len(str(n)) - 1}")
             for n in PATHOLOGICAL_SIZES for name in ENCODERS
             if name == "gpt2fast" or n <= PEER_MAX_REPEAT]
    metafunc.parametrize(("gpt2_encoder", "repeat"), cases, indirect=["gpt2_encoder"])


# --------------------------------------------------------------------------------- results + summary
def pytest_addoption(parser):
    parser.addoption("--gpt2fast-json", metavar="PATH", default=None,
                     help=f"where to write the benchmark results JSON (default: ${bench_results.JSON_ENV}, "
                          f"else {os.path.relpath(bench_results.DEFAULT_JSON, REPO_ROOT)}); render it with "
                          "`python -m gpt2fast.bench report PATH`")


class Measure:
    """Wraps the ``benchmark`` fixture of one test: runs, annotates ``extra_info``, records for the summary."""

    def __init__(self, benchmark):
        self.benchmark = benchmark

    def run(self, fn: Callable, *, group: str, rounds: Optional[int] = None, warmup_rounds: int = 0):
        """Benchmark ``fn``; returns (seconds, fn's result). Seconds: the median round, or, when
        benchmarks are disabled (--benchmark-disable), the one call timed here, so quick mode still
        produces rough figures."""
        b = self.benchmark
        b.group = group
        timings = []

        def timed():
            start = time.perf_counter()
            result = fn()
            timings.append(time.perf_counter() - start)
            return result

        target = fn if b.enabled else timed
        if rounds is None:
            result = b(target)
        else:
            result = b.pedantic(target, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        SESSION["timing"] = ("median of pytest-benchmark rounds" if b.enabled
                             else "one call each (benchmarks disabled): rough figures")
        return (b.stats.stats.median if b.enabled else timings[-1]), result

    def note(self, **info) -> None:
        self.benchmark.extra_info.update(info)

    @staticmethod
    def summary_note(line: str) -> None:
        """A line printed under the table at the end of the session."""
        NOTES.append(line)

    def throughput(self, fn: Callable, who, *, group: str, peer: str, nbytes: int, goal: Optional[float] = None,
                   rounds: Optional[int] = None, warmup_rounds: int = 0, tokens: Optional[Callable] = None,
                   show_seconds: bool = False):
        """Time ``fn`` over ``nbytes`` of UTF-8 input and record MB/s (and the seconds, if ``show_seconds``,
        in the summary). ``tokens(result)``, if given, is the output size checked against the peer's.
        Returns (seconds, fn's result)."""
        seconds, result = self.run(fn, group=group, rounds=rounds, warmup_rounds=warmup_rounds)
        mb_per_s = nbytes / 1e6 / seconds
        n_tokens = tokens(result) if tokens else None
        self.note(impl=who.name, role=who.role, peer=peer, input_MB=round(nbytes / 1e6, 3),
                  seconds=seconds, **{"MB/s": round(mb_per_s, 2)})
        if n_tokens is not None:
            self.note(tokens=n_tokens)
        figure = Figure(who.name, mb_per_s, "MB/s", True, seconds if show_seconds else None, n_tokens)
        record(group, who.role, figure, goal)
        return seconds, result

    def resident_memory(self, encoder: Encoder, *, group: str, peer: str, goal: Optional[float] = None) -> dict:
        """RSS growth of a fresh interpreter that imports the library, then loads GPT-2 and encodes a
        string; the figure compared is the load step (the vocabulary), with the import reported beside it."""
        if not Path("/proc/self/statm").exists():
            pytest.skip("resident memory is read from /proc/self/statm (Linux only)")
        _, rss = self.run(lambda: rss_of_subprocess(encoder.import_code, encoder.load_code), group=group, rounds=1)
        mib = {k: v / 2**20 for k, v in rss.items()}
        detail = {"import_MiB": round(mib["imported"] - mib["start"], 2),
                  "load_MiB": round(mib["loaded"] - mib["imported"], 2),
                  "import+load_MiB": round(mib["loaded"] - mib["start"], 2),
                  "total_RSS_MiB": round(mib["loaded"], 2)}
        self.note(impl=encoder.name, role=encoder.role, peer=peer, **detail)
        line = (f"RSS {encoder.name}: import +{detail['import_MiB']:.1f} MiB, load GPT-2 + encode "
                f"+{detail['load_MiB']:.1f} MiB, process total {detail['total_RSS_MiB']:.1f} MiB")
        print(line)
        self.summary_note(line)
        record(group, encoder.role, Figure(encoder.name, detail["load_MiB"], "MiB", higher_is_better=False), goal)
        return detail


@pytest.fixture
def measure(benchmark) -> Measure:
    return Measure(benchmark)


_RSS_SCRIPT = """
import json, os
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
start = rss()
{import_code}
imported = rss()
{load_code}
loaded = rss()
print(json.dumps({{"start": start, "imported": imported, "loaded": loaded}}))
"""


def rss_of_subprocess(import_code: str, load_code: str) -> Dict[str, int]:
    """Resident bytes of a fresh interpreter at start, after ``import_code`` and after ``load_code``."""
    script = _RSS_SCRIPT.format(import_code=import_code, load_code=load_code)
    # Started outside the checkout: a fresh interpreter puts its working directory first on sys.path.
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary_lines() -> List[str]:
    all_rows = bench_results.rows()
    mismatches = [f"MISMATCH in {row.benchmark!r}: {row.ours.tokens} tokens from ours, "
                  f"{row.peer.tokens} from {row.peer.impl}"
                  for row in all_rows if row.ours and row.peer and None not in (row.ours.tokens, row.peer.tokens)
                  and row.ours.tokens != row.peer.tokens]
    return text_table(all_rows) + mismatches + NOTES


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not bench_results.GROUPS:
        return
    tr = terminalreporter
    tr.write_sep("=", "gpt2fast benchmarks: ours vs peer")
    gpu = SESSION["gpu"] or "none"
    tr.write_line(f"mode: {'quick' if QUICK else 'full'}; {N_CPUS} CPU(s); GPU: {gpu}; "
                  f"corpus: {SESSION['corpus'] or '-'}")
    if SESSION["measured_ceilings"]:
        tr.write_line("measured ceilings: " + ", ".join(f"{k} {v}" for k, v in SESSION["measured_ceilings"].items()))
    timings = "; ".join(t for t in (SESSION["timing"], SESSION["gpu_timing"]) if t) or "-"
    tr.write_line(f"timings: {timings}; ratio > 1 means ours is better (faster, or less memory)")
    for line in _summary_lines():
        tr.write_line(line)
    path = bench_results.json_path(config.getoption("--gpt2fast-json", default=None))
    try:
        tr.write_line(f"results JSON: {bench_results.write_json(path, QUICK)} "
                      f"(render: python -m gpt2fast.bench report {path})")
    except OSError as e:  # an unwritable path must not hide the table above
        tr.write_line(f"results JSON NOT written to {path}: {e}")
