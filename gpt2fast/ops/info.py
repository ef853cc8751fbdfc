"""What gpt2fast's ops can run on this machine, and why not: ``python -m gpt2fast.ops.info``.

Like DeepSpeed's ds_report: the environment (torch, CUDA device, Triton, nvcc, the CUDA ops extension), then one
line per op and backend. Nothing is compiled unless ``--build`` is given (which compiles the CUDA ops now, if they
need compiling, and reports the result). Exits 0; with ``--build``, 1 when the CUDA ops are still unavailable.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from typing import List, Optional, Tuple

# (op, backends it has code for) — "torch" is the plain reference every op has.
OPS = {
    "attention": ("torch", "triton", "cuda"),
    "layer_norm": ("torch", "triton", "cuda"),
    "bias_gelu": ("torch", "triton", "cuda"),
    "cross_entropy": ("torch", "triton", "cuda"),
    "linear_cross_entropy": ("torch", "triton", "cuda"),
    "adamw": ("torch", "cuda"),
}
NO_CODE = {
    ("adamw", "triton"): "no Triton kernel (the fused step is CUDA C++)",
}
REFERENCE_NOTE = {
    "adamw": "gpt2fast.ops.adamw.AdamW's PyTorch loop (torch.optim.AdamW is the peer)",
    "linear_cross_entropy": "chunked torch matmuls + F.cross_entropy",
}


def _safe(fn, default=None):
    try:
        return fn()
    except Exception as e:  # a diagnostic must not crash on the thing it diagnoses
        return default if default is not None else f"error: {type(e).__name__}: {e}"


def torch_facts() -> List[Tuple[str, str]]:
    import torch

    rows = [("torch", f"{torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only'} "
                      f"build)")]
    if torch.version.cuda is None:
        rows.append(("CUDA", "not available: this torch is a CPU-only build"))
    elif not torch.cuda.is_available():
        rows.append(("CUDA", "not available: no CUDA GPU is visible (torch.cuda.is_available() is False)"))
    else:
        rows.append(("CUDA", f"available: {torch.cuda.device_count()} device(s)"))
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            bf16 = "bf16 yes" if major >= 8 else "bf16 no (sm_80+ needed)"
            rows.append((f"GPU {i}", f"{torch.cuda.get_device_name(i)}, sm_{major}{minor}, {bf16}"))
    return rows


def triton_facts() -> Tuple[str, Optional[str]]:
    """(description, why Triton kernels cannot run here or None)."""
    import torch

    from gpt2fast.ops import _dispatch

    err = _dispatch.triton_import_error()
    if err:
        return f"not importable: {err}", err
    import triton

    interp = _dispatch.triton_interpreting()
    mode = "interpreter ON (TRITON_INTERPRET=1: kernels run on CPU tensors, slowly)" if interp else \
        "interpreter off"
    if torch.cuda.is_available():
        return f"{triton.__version__}, {mode}", None
    if interp:
        return f"{triton.__version__}, {mode}", None
    return f"{triton.__version__}, {mode}", "no CUDA GPU (TRITON_INTERPRET=1 runs the kernels on CPU for testing)"


def nvcc_facts() -> str:
    from gpt2fast.ops import _cuda_loader

    nvcc = _cuda_loader.nvcc_path()
    if nvcc is None:
        return "not found (CUDA_HOME unset and no nvcc on PATH)"
    try:
        release = _cuda_loader.nvcc_release(nvcc)
        archs = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=30).stdout.split()
        archs = [a.replace("compute_", "sm_") for a in archs]
        span = f"; builds {archs[0]} .. {archs[-1]}" if archs else ""
        return f"{nvcc} (CUDA {release or '?'}{span})"
    except Exception as e:
        return f"{nvcc} (cannot run it: {type(e).__name__}: {e})"


def cuda_ops_facts(build: bool):
    """(description, status) of the CUDA ops extension; compiles it only when ``build``."""
    from gpt2fast.ops import _cuda_loader

    status = _cuda_loader.cuda_ops_status(load=build)
    if status.module is not None:
        where = "built at install time (AOT)" if status.how == "aot" else "compiled on first use (JIT, cached)"
        archs = _safe(lambda: status.module.compiled_architectures(), "unknown")
        return f"{where}; compiled for sm {archs}" + _arch_warning(archs), status
    if status.how == "jit":
        return "not built at install time; compiles on first use here (python -m gpt2fast.ops.info --build " \
               "does it now)", status
    return f"not available: {status.reason}", status


def _arch_warning(archs: str) -> str:
    import torch

    if not torch.cuda.is_available() or not re.fullmatch(r"[\d,]+", archs or ""):
        return ""
    built = [int(a) for a in archs.split(",")]
    major, minor = torch.cuda.get_device_capability()
    if any(a // 100 == major and a % 100 <= minor * 10 for a in built):
        return ""
    return f" (WARNING: nothing for this GPU's sm_{major}{minor}; it runs only if PTX was embedded)"


def backend_rows(triton_problem: Optional[str], cuda_status) -> List[Tuple[str, str, str, str]]:
    rows = []
    for op, has in OPS.items():
        for backend in ("torch", "triton", "cuda"):
            if backend not in has:
                rows.append((op, backend, "no", NO_CODE.get((op, backend), "no kernel")))
            elif backend == "torch":
                rows.append((op, backend, "yes", REFERENCE_NOTE.get(op, "plain PyTorch reference")))
            elif backend == "triton":
                rows.append((op, backend, "no", triton_problem) if triton_problem else
                            (op, backend, "yes", _triton_note()))
            elif cuda_status.module is not None:
                rows.append((op, backend, "yes", _cuda_note(op)))
            elif cuda_status.how == "jit":
                rows.append((op, backend, "on first use", "compiled the first time backend 'cuda' is used "
                                                          "(or run with --build)"))
            else:
                rows.append((op, backend, "no", cuda_status.reason or "unavailable"))
    return rows


def _cuda_note(op: str) -> str:
    import torch

    if op == "attention":
        if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8:
            return "no: needs sm_80+ (mma.m16n8k16); fp16/bf16, head dim 64/128"
        return "fp16/bf16, head dim 64/128 (tensor cores, mma.m16n8k16)"
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8:
        return "fp32/fp16 (bf16 needs sm_80+)"
    return "GPU kernels"


def _triton_note() -> str:
    import torch

    from gpt2fast.ops import _dispatch

    if not torch.cuda.is_available() and _dispatch.triton_interpreting():
        return "CPU tensors under the interpreter (testing only)"
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8:
        return "fp32/fp16 (bf16 needs sm_80+)"
    return "GPU kernels"


def report(build: bool = False) -> Tuple[str, bool]:
    """The report's text, and whether the CUDA ops are usable."""
    lines = ["gpt2fast ops report (python -m gpt2fast.ops.info)", "=" * 100]
    facts = _safe(torch_facts, [("torch", "not importable")])
    if isinstance(facts, str):
        facts = [("torch", facts)]
    triton_desc = _safe(triton_facts, ("probe failed", "the Triton probe failed"))
    if isinstance(triton_desc, str):
        triton_desc = (triton_desc, triton_desc)
    facts.append(("Triton", triton_desc[0]))
    facts.append(("nvcc", _safe(nvcc_facts)))
    cuda = _safe(lambda: cuda_ops_facts(build), None)
    if cuda is None or isinstance(cuda, str):
        from gpt2fast.ops._cuda_loader import CudaOpsStatus

        cuda = (f"probe failed: {cuda}", CudaOpsStatus(None, None, "the probe failed"))
    facts.append(("CUDA ops extension", cuda[0]))
    width = max(len(k) for k, _ in facts) + 2
    lines += [f"{k:<{width}}{v}" for k, v in facts]
    lines += ["=" * 100, f"{'op':<22}{'backend':<9}{'available':<11}note", "-" * 100]
    last = None
    for op, backend, ok, note in backend_rows(triton_desc[1], cuda[1]):
        lines.append(f"{op if op != last else '':<22}{backend:<9}{ok:<11}{note}")
        last = op
    lines.append("-" * 100)
    lines.append("backend='auto' on a GPU times every path that can run (ours in CUDA C++ and Triton, the PyTorch "
                 "peer) the first time it meets a shape, and keeps the fastest; where no fused path can run it "
                 "falls back to torch with a one-time warning.")
    lines += ["", *decision_lines()]
    return "\n".join(lines), cuda[1].module is not None


def decision_lines() -> List[str]:
    """The decisions backend='auto' measured on this machine (gpt2fast/ops/_decisions.py)."""
    import os

    from gpt2fast.ops import _decisions

    file = _decisions.path()
    entries = _decisions.read(file)
    override = os.environ.get("GPT2FAST_PREFER_BACKEND")
    lines = [f"backend decisions measured on this machine: {file}"
             + ("" if entries else " (none yet: they are made on the GPU, on first use)")]
    if override:
        lines.append(f"  GPT2FAST_PREFER_BACKEND={override} overrides them")
    for key in sorted(entries):
        entry = entries[key]
        times = ", ".join(f"{p} {ms:.3f} ms" for p, ms in sorted(entry.get("ms", {}).items(), key=lambda x: x[1]))
        lines.append(f"  {entry['backend']:<7}{key}")
        lines.append(f"         {times}  ({entry.get('measured', 'undated')})")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2fast.ops.info", description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true",
                        help="compile the CUDA ops now if they need compiling (cached), and report the result")
    args = parser.parse_args(argv)
    text, cuda_ok = report(build=args.build)
    print(text)
    return 1 if args.build and not cuda_ok else 0


if __name__ == "__main__":
    sys.exit(main())
