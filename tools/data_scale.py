"""How prepare's memory and time grow with the corpus: synthetic corpora with planted near-duplicates, each
prepared in a fresh process whose peak resident memory is read at the end; the slope between two sizes,
and the extrapolation to WebText's 8M documents.

    python tools/data_scale.py 50000 200000 [--workers 1] [--dir /tmp/data_scale]

tests/test_data_scale.py runs the same measurement and checks the per-document slope."""
from __future__ import annotations

import argparse
import gzip
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "be", "da", "fo", "gu", "ho", "ji", "pe", "wa",
              "ze", "qu", "xi", "yo"]
WEBTEXT_DOCS = 8_000_000


def synthetic_corpus(path: Path, n_docs: int, seed: int = 0, words: int = 80, near_share: float = 0.1) -> int:
    """``n_docs`` documents of made-up words (passing the quality rules), a ``near_share`` of them near-copies
    of an earlier one (one or two words changed: Jaccard ~0.8-0.9 on 5-word shingles); returns the planted
    count."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(50_000)]
    recent = []
    planted = 0
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
        for _ in range(n_docs):
            if recent and rng.random() < near_share:
                w = list(rng.choice(recent))
                for _ in range(rng.randint(1, 2)):
                    w[rng.randrange(len(w))] = rng.choice(vocab)
                planted += 1
            else:
                w = rng.choices(vocab, k=words)
                recent.append(w)
                if len(recent) > 1000:
                    recent.pop(rng.randrange(len(recent)))
            f.write(json.dumps({"text": " ".join(w).capitalize() + "."}) + "\n")
    return planted


_CHILD = """
import json, resource, sys, time
from gpt2fast.data import PrepareOptions, pipeline, prepare

def hwm_kb():  # VmHWM, not RUSAGE_SELF: ru_maxrss carries over the peak of the process that started this one
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])

work = {}
run_stages = pipeline._run_stages
def measured(*args, **kwargs):  # the peak of the data work itself, before the funnel plot loads matplotlib
    result = run_stages(*args, **kwargs)
    work["kb"] = hwm_kb()
    return result
pipeline._run_stages = measured
src, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.perf_counter()
m = prepare([src], out, PrepareOptions(workers=workers, val_fraction=0.001), force=True, log=lambda s: None)
seconds = time.perf_counter() - t
near = next(s for s in m["stages"] if s["name"] == "near_dedup")
kb = work["kb"]
kb_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"docs": m["stages"][0]["docs_in"], "mb": m["stages"][0]["bytes_in"] / 1e6,
                  "quality_passed": m["stages"][4]["docs_out"], "kept": near["docs_out"],
                  "near_dropped": near["dropped_by"].get("near_duplicate", 0), "seconds": seconds,
                  "workers": workers, "driver_rss_mb": kb / 1024, "worker_rss_mb": kb_children / 1024,
                  "peak_rss_mb": (kb + (workers if workers > 1 else 0) * kb_children) / 1024}))
"""


def measure(src: Path, out: Path, workers: int = 1) -> dict:
    """Prepare ``src`` in a fresh process; its counts, seconds and peak resident memory during the data work
    (``peak_rss_mb``: the driver's peak up to the end of the three passes, before the funnel plot's fixed cost,
    plus, with worker processes, ``workers`` times the largest worker's peak: an upper bound, as forked workers
    share pages with the driver)."""
    done = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out), str(workers)], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def slope(small: dict, large: dict) -> dict:
    """Bytes of peak memory and seconds per kept document between two runs, and both at 8M documents."""
    docs = large["kept"] - small["kept"]
    per_doc_bytes = (large["peak_rss_mb"] - small["peak_rss_mb"]) * 2 ** 20 / docs
    per_doc_s = (large["seconds"] - small["seconds"]) / docs
    return {"bytes_per_kept_doc": per_doc_bytes, "seconds_per_doc": per_doc_s,
            "webtext_rss_gb": (large["peak_rss_mb"] * 2 ** 20 + per_doc_bytes * (WEBTEXT_DOCS - large["kept"]))
            / 2 ** 30, "webtext_hours_per_worker": per_doc_s * WEBTEXT_DOCS / 3600}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sizes", type=int, nargs=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--dir", type=Path, default=None)
    a = p.parse_args()
    root = a.dir or Path(tempfile.mkdtemp(prefix="data_scale-"))
    root.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in a.sizes:
        src = root / f"synthetic_{n}.jsonl.gz"
        planted = synthetic_corpus(src, n)
        r = measure(src, root / f"out_{n}", a.workers)
        r["planted"] = planted
        runs.append(r)
        print(json.dumps(r))
    print(json.dumps(slope(*runs)))


if __name__ == "__main__":
    main()
