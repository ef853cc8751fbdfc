"""The diagnostics (python -m gpt2fast.ops.info) and the CUDA ops loader, on whatever machine runs the tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2fast import _native_sources
from gpt2fast.ops import _cuda_loader, info

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


def run_info(*args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "gpt2fast.ops.info", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def test_info_runs_and_covers_every_op_and_backend():
    res = run_info()
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for key in ("torch", "CUDA", "Triton", "nvcc", "CUDA ops extension"):
        assert key in out, f"the report has no {key!r} line:\n{out}"
    for op in info.OPS:
        assert op in out, f"the report does not mention {op}:\n{out}"
    for backend in ("torch", "triton", "cuda"):
        assert f" {backend} " in out
    assert "Traceback" not in res.stderr


@pytest.mark.skipif(HAS_CUDA, reason="checks the reasons given on a machine without a CUDA GPU")
def test_info_says_why_cuda_is_unavailable():
    out = run_info().stdout
    why = ("CPU-only build", "no CUDA GPU is visible")
    assert any(w in out for w in why), out
    cuda_rows = [line for line in out.splitlines() if " cuda " in line]
    assert len(cuda_rows) == len(info.OPS)
    for line in cuda_rows:
        assert " no " in line and line.split(" no ", 1)[1].strip(), f"no reason on: {line!r}"


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU machine --build compiles the extension")
def test_info_build_fails_cleanly_without_a_gpu():
    res = run_info("--build")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and "not available" in res.stdout


@pytest.mark.skipif(HAS_CUDA, reason="checks the loader's answer on a machine without a CUDA GPU")
def test_load_cuda_ops_returns_none_with_a_reason():
    _cuda_loader._reset_for_tests()
    try:
        assert _cuda_loader.load_cuda_ops() is None
        status = _cuda_loader.cuda_ops_status()
        assert status.module is None and status.how is None
        assert status.reason and ("CPU-only" in status.reason or "GPU" in status.reason), status.reason
    finally:
        _cuda_loader._reset_for_tests()


def test_jit_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("GPT2FAST_NO_CUDA_JIT", "1")
    assert "GPT2FAST_NO_CUDA_JIT" in _cuda_loader.jit_problem()


def test_every_kernel_is_listed_once_and_present():
    listed = _native_sources.CUDA_SOURCES + _native_sources.CUDA_HEADERS
    assert len(set(listed)) == len(listed)
    for rel in listed:
        assert (REPO / rel).is_file(), f"{rel} is listed in gpt2fast/_native_sources.py but missing"
    on_disk = {f"csrc/kernels/{p.name}" for p in (REPO / "csrc" / "kernels").glob("*.cu")}
    assert on_disk <= set(_native_sources.CUDA_SOURCES), \
        f"not listed in CUDA_SOURCES: {sorted(on_disk - set(_native_sources.CUDA_SOURCES))}"
    headers = {f"csrc/kernels/{p.name}" for p in (REPO / "csrc" / "kernels").glob("*.h*")}
    assert headers <= set(_native_sources.CUDA_HEADERS)


def test_source_files_found_from_the_checkout():
    files = _cuda_loader.source_files()
    assert files is not None
    assert [p.name for p in files["sources"]] == [Path(r).name for r in _native_sources.CUDA_SOURCES]
