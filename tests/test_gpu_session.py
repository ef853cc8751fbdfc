"""tools/gpu_session.sh, the one prepared way onto a lent GPU: its plan fits the device call, and a stage over its
budget is stopped and reported while the stages after it still run (checked with a stand-in Python)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_session.sh"
LIMIT_S = 540  # what one device call may take after the machine has started (issue 10)


def _run(*args, env=None, timeout=120):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)


def test_the_plan_fits_one_device_call():
    out = _run("--plan")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    stages = dict(re.fullmatch(r"(\S+)\s+(\d+) s", line).groups() for line in lines[:-1])
    assert set(stages) == {"build", "test", "bench-ops", "bench-train", "wrap-up"}
    total = int(re.fullmatch(r"total: (\d+) s", lines[-1]).group(1))
    assert total == sum(int(v) for v in stages.values()) and total <= LIMIT_S


def test_every_budget_is_justified_in_a_comment():
    text = SCRIPT.read_text()
    budgets = dict(re.findall(r"\[([a-z-]+)\]=(\d+)", text.split("declare -A BUDGET=")[1].splitlines()[0]))
    for stage, seconds in budgets.items():
        assert re.search(rf"#\s+{re.escape(stage)}:.*?-> {seconds}\n", text, re.S), \
            f"the budget of {stage} ({seconds} s) has no comment ending in '-> {seconds}'"


def test_unknown_stage_is_a_clear_error():
    out = _run("bench-everything")
    assert out.returncode == 2 and "unknown argument 'bench-everything'" in out.stderr


def test_without_a_gpu_it_says_to_use_dry_run():
    fake = _fake_python(Path(os.environ.get("TMPDIR", "/tmp")), gpu=False, sleep_s=0)
    out = _run("build", env={"PYTHON": str(fake)})
    assert out.returncode == 2 and "--dry-run" in out.stderr


def _fake_python(folder: Path, gpu: bool, sleep_s: int) -> Path:
    """A stand-in for python3: reports a GPU (or none), hangs in `pip install` (a build over budget), and
    answers every other command at once (pytest and the ops report 'pass')."""
    folder.mkdir(parents=True, exist_ok=True)
    fake = folder / f"fake-python-{gpu}-{sleep_s}"
    fake.write_text(f"""#!/usr/bin/env bash
if [[ "$1" == -c && "$2" == *is_available* ]]; then exit {0 if gpu else 1}; fi
if [[ "$1 $2" == "-m pip" ]]; then sleep {sleep_s}; exit 0; fi
if [[ "$1 $2" == "-m pytest" ]]; then echo "1 passed"; exit 0; fi
echo "stand-in: $*"
exit 0
""")
    fake.chmod(0o755)
    return fake


@pytest.mark.skipif(sys.platform != "linux", reason="needs GNU timeout")
def test_a_stage_over_budget_is_stopped_and_the_rest_still_runs(tmp_path):
    fake = _fake_python(tmp_path, gpu=True, sleep_s=60)
    out = _run("build", "test", env={"PYTHON": str(fake), "OUT": str(tmp_path / "out"),
                                     "GPU_SESSION_BUDGETS": "build=2 test=30"}, timeout=50)
    assert out.returncode == 1, out.stdout + out.stderr
    summary = out.stdout.split("=== summary")[1]
    assert re.search(r"build: OVER BUDGET, stopped at [2-9] s of 2", summary), summary
    assert re.search(r"test: ok \(\d+ s of 30\)", summary), summary
    # what comes back: at most 8 files, the summary among them, with the stages' table
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "summary.md" in files and "logs.tar.gz" in files and len(files) <= 8
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| build | OVER BUDGET" in table and "| test | ok" in table
