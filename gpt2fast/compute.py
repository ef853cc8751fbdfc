"""Compute, time, cost and memory of training a GPT-2: ``python -m gpt2fast.compute``.

    python -m gpt2fast.compute --model gpt2-xl --tokens 10e9 --gpu a100 --gpus 8 [--price 2.0] [--mfu 0.4]
                               [--micro-batch N] [--seq 1024] [--plot out.png]
    python -m gpt2fast.compute --n-layer 24 --n-embd 2048 --n-head 16 --tokens 50e9 --gpu h100

Formulas (C = n_embd, L = n_layer, T = sequence length, V = vocabulary, N = parameters):

* Parameters: token embedding V*C (tied with the output head, counted once), positions T*C, per block
  12*C^2 + 13*C (attention qkv + projection, MLP 4C + back, two LayerNorms, biases), final LayerNorm 2*C.
  Non-embedding N (the N of scaling laws) leaves out the token and position embeddings.
* Training FLOPs per token, "6N": 6 FLOPs per parameter (2 forward, 4 backward), the paper-era rule.
  "Exact" (``model_flops_per_token``: the count the trainer's and the training benchmark's MFU divide by):
  6 * (N_non_embedding + V*C) + 12 * L * C * T, i.e. 6 per matmul weight (the output head included, the
  position lookup, which is no matmul, left out) plus the attention scores and their weighted sum
  (QK^T and AV: 2 * 2 * T * C FLOPs per token per layer forward, x3 with the backward, causal masking ignored).
  This is PaLM's 6N + 12*L*H*Q*T (H*Q = C) as nanoGPT's estimate_mfu counts it: N with the tied token
  embedding (as the output head) and without the position table. T is the length trained on.
* Time: FLOPs / (GPUs * peak * MFU); GPU-hours = FLOPs / (peak * MFU) / 3600; cost = GPU-hours * price.
  MFU defaults to ``DEFAULT_MFU`` = 0.4, a typical achieved fraction of the dense bf16 tensor-core peak;
  ``--mfu-from results.json`` takes instead our best training-step MFU from a benchmark results file
  (``pytest benchmarks/test_bench_train.py --benchmark-only`` on a GPU writes one), and ``--mfu`` sets it.
* Memory per GPU (data parallel, nothing sharded): fp32 training keeps weights 4 + gradients 4 + AdamW
  moments 8 = 16 bytes/parameter; mixed precision keeps bf16 weights 2 + bf16 gradients 2 + fp32 master
  weights 4 + AdamW moments 8 = 16 bytes/parameter too (the bf16 copies replace nothing, the fp32 master is
  extra). With FSDP over G GPUs this static part is divided by G.
* Activations (estimate after Korthikanti et al. 2022, "Reducing activation recomputation"): per layer per
  token 34*C bytes in 16-bit plus 5*H*T bytes for the attention matrix; we use flash attention, which never
  stores the T x T matrix (only a 4-byte logsumexp per head), so the estimate is 34*C + 4*H bytes per layer
  per token in mixed precision, twice the 34*C in fp32. On top: the logits, V * (2 + 4) bytes per token
  (bf16 logits + fp32 softmax/gradient; 4 + 4 in fp32), and the embedding output 2*C (4*C).
  With gradient checkpointing each block keeps only its input (2*C bytes per token per layer, 4*C in fp32)
  and one block's full activations are live again during its recomputation.
* Chinchilla (Hoffmann et al. 2022): about 20 training tokens per parameter, at 6*N*D FLOPs.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

from gpt2fast.hardware import PLANNING_GPUS

# Dense 16-bit tensor-core peak FLOP/s per GPU the planner knows (no sparsity): V100 SXM2 fp16, A100 bf16,
# H100/H200 SXM bf16, from the one peak table in gpt2fast.hardware (the trainer looks its GPU up there by name).
GPU_PEAK_FLOPS = {key: gpu.bf16 * 1e12 for key, gpu in PLANNING_GPUS.items()}
# Memory per GPU in bytes (V100 32 GB, A100 80 GB, H100 80 GB, H200 141 GB), counted as 10^9 bytes.
GPU_MEMORY_BYTES = {key: gpu.memory_gb * 1e9 for key, gpu in PLANNING_GPUS.items()}

# Model FLOPs utilisation assumed when none is given: a placeholder until we measure ours on a GPU.
DEFAULT_MFU = 0.4
CHINCHILLA_TOKENS_PER_PARAM = 20
GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def gpu_key(name: str) -> str:
    """'a100', 'A100-SXM4-80GB' -> 'A100'; unknown names raise ValueError listing the known ones."""
    import re

    upper = name.strip().upper()
    for key in GPU_PEAK_FLOPS:
        if re.search(rf"(?<![0-9A-Z]){key}(?![0-9])", upper):
            return key
    raise ValueError(f"unknown GPU {name!r}; choose one of {', '.join(k.lower() for k in GPU_PEAK_FLOPS)}")


# ------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int = 50257
    seq: int = 1024  # context length (positions) and training sequence length

    def __post_init__(self):
        for f in ("n_layer", "n_embd", "n_head", "vocab_size", "seq"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be at least 1, got {getattr(self, f)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @classmethod
    def from_preset(cls, name: str, seq: Optional[int] = None, **overrides) -> Shape:
        from gpt2fast.model import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)} or give "
                             f"--n-layer/--n-embd/--n-head")
        p = PRESETS[name]
        values = dict(n_layer=p["n_layer"], n_embd=p["n_embd"], n_head=p["n_head"],
                      seq=seq or p.get("block_size", 1024))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_config(cls, config) -> Shape:
        """From a GPT2Config or its dict (as stored in a checkpoint's trainer_state.pt)."""
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        return cls(n_layer=get("n_layer"), n_embd=get("n_embd"), n_head=get("n_head"),
                   vocab_size=get("vocab_size", 50257), seq=get("block_size", 1024))

    def num_params(self, non_embedding: bool = False) -> int:
        """Counts as ``GPT2.num_params`` does: tied embedding once, no padding rows."""
        C = self.n_embd
        blocks = self.n_layer * (12 * C * C + 13 * C)
        if non_embedding:
            return blocks + 2 * C
        return blocks + 2 * C + (self.vocab_size + self.seq) * C


def flops_per_token(shape: Shape) -> dict:
    """{'6N': 6 * N, 'exact': 6 * (N_non_embedding + V*C) + 12 * L * C * T} training FLOPs per token."""
    n = shape.num_params()
    exact = (6 * (shape.num_params(non_embedding=True) + shape.vocab_size * shape.n_embd)
             + 12 * shape.n_layer * shape.n_embd * shape.seq)
    return {"6N": 6 * n, "exact": exact}


def model_flops_per_token(config, seq: Optional[int] = None) -> int:
    """The exact training FLOPs per token of a model (a GPT2Config or its dict) trained on sequences of ``seq``
    tokens (default: its context length): what an MFU divides by. The attention term grows with the sequence
    trained on, not with the context the model could take."""
    shape = Shape.from_config(config)
    if seq is not None:
        shape = dataclasses.replace(shape, seq=seq)
    return flops_per_token(shape)["exact"]


# ----------------------------------------------------------------------------------------- memory
def static_memory(n_params: int, mixed_precision: bool = True) -> dict:
    """Bytes for weights, gradients and AdamW state (see the module docstring)."""
    if mixed_precision:
        parts = {"weights (bf16)": 2 * n_params, "gradients (bf16)": 2 * n_params,
                 "master weights (fp32)": 4 * n_params, "AdamW moments (fp32)": 8 * n_params}
    else:
        parts = {"weights (fp32)": 4 * n_params, "gradients (fp32)": 4 * n_params,
                 "AdamW moments (fp32)": 8 * n_params}
    parts["total"] = sum(parts.values())
    return parts


def activation_bytes_per_sequence(shape: Shape, checkpointing: bool = False, mixed_precision: bool = True) -> float:
    """Estimated activation memory for one sequence of ``shape.seq`` tokens (flash attention)."""
    C, L, H, T, V = shape.n_embd, shape.n_layer, shape.n_head, shape.seq, shape.vocab_size
    scale = 1 if mixed_precision else 2
    layer = 34 * C * scale + 4 * H  # per token; flash attention: no T x T matrix, a logsumexp per head
    head = V * (6 if mixed_precision else 8) + 2 * C * scale  # logits + softmax grad, embedding output
    if checkpointing:
        per_token = L * 2 * C * scale + layer + head
    else:
        per_token = L * layer + head
    return per_token * T


def max_micro_batch(shape: Shape, memory: float, checkpointing: bool, mixed_precision: bool = True,
                    shards: int = 1) -> int:
    """Largest micro-batch (sequences) whose static state / shards + activations fit ``memory`` bytes; 0: none."""
    free = memory - static_memory(shape.num_params(), mixed_precision)["total"] / shards
    if free <= 0:
        return 0
    return int(free // activation_bytes_per_sequence(shape, checkpointing, mixed_precision))


# ---------------------------------------------------------------------------------------- estimate
@dataclass
class Estimate:
    shape: Shape
    tokens: float
    gpu: str
    gpus: int
    mfu: float
    price: Optional[float]
    micro_batch: int

    @property
    def n_params(self) -> int:
        return self.shape.num_params()

    @property
    def n_params_non_embedding(self) -> int:
        return self.shape.num_params(non_embedding=True)

    @property
    def flops_6nd(self) -> float:
        return float(flops_per_token(self.shape)["6N"]) * self.tokens

    @property
    def flops_exact(self) -> float:
        return float(flops_per_token(self.shape)["exact"]) * self.tokens

    @property
    def gpu_hours(self) -> float:
        """From the exact FLOP count (the one the trainer's MFU is measured against)."""
        return self.flops_exact / (GPU_PEAK_FLOPS[self.gpu] * self.mfu) / 3600

    @property
    def wall_hours(self) -> float:
        return self.gpu_hours / self.gpus

    @property
    def cost(self) -> Optional[float]:
        return None if self.price is None else self.gpu_hours * self.price

    @property
    def chinchilla_tokens(self) -> float:
        return CHINCHILLA_TOKENS_PER_PARAM * self.n_params

    @property
    def chinchilla_flops(self) -> float:
        return 6.0 * self.n_params * self.chinchilla_tokens


def estimate(shape: Shape, tokens: float, gpu: str = "a100", gpus: int = 1, mfu: float = DEFAULT_MFU,
             price: Optional[float] = None, micro_batch: int = 1) -> Estimate:
    if not tokens > 0:
        raise ValueError(f"--tokens must be positive, got {tokens}")
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
    if price is not None and price < 0:
        raise ValueError(f"--price must be >= 0, got {price}")
    if micro_batch < 1:
        raise ValueError(f"--micro-batch must be at least 1, got {micro_batch}")
    return Estimate(shape, float(tokens), gpu_key(gpu), gpus, mfu, price, micro_batch)


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB"


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.1f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


def measured_mfu(results_path) -> Tuple[float, str]:
    """Our best measured training-step MFU in a benchmark results JSON (``gpt2fast.bench``), and where it was
    measured. A ValueError naming the file when it holds none."""
    from gpt2fast.bench import load_results

    results = load_results(results_path)
    found = [(row.ours.shares["detected"], row.ours.impl) for row in results.rows
             if row.suite == "train" and row.ours is not None and row.ours.unit == "tokens/s"
             and "detected" in (row.ours.shares or {})]
    if not found:
        raise ValueError(f"--mfu-from {results_path}: the file holds no measured training-step MFU; run "
                         f"`pytest benchmarks/test_bench_train.py --benchmark-only` on a GPU to write one, or "
                         f"give --mfu")
    mfu, impl = max(found)
    return mfu, f"{impl} on {results.machine.get('gpu') or 'an unnamed GPU'} ({results_path})"


def report(e: Estimate, mfu_source: Optional[str] = None) -> str:
    s, lines = e.shape, []
    fpt = flops_per_token(s)
    lines.append(f"model: n_layer={s.n_layer} n_embd={s.n_embd} n_head={s.n_head} vocab={s.vocab_size} seq={s.seq}")
    lines.append(f"parameters: N = {e.n_params:,} ({e.n_params / 1e6:,.1f}M), non-embedding "
                 f"{e.n_params_non_embedding:,} ({e.n_params_non_embedding / 1e6:,.1f}M)")
    lines.append(f"tokens: D = {e.tokens:.3g}")
    lines.append("training FLOPs:")
    lines.append(f"  6ND                                   {e.flops_6nd:.3e}  ({fpt['6N']:.3e} per token)")
    lines.append(f"  exact 6(N_ne+VC) + 12*L*C*T           {e.flops_exact:.3e}  ({fpt['exact']:.3e} per token, "
                 f"attention {12 * s.n_layer * s.n_embd * s.seq / fpt['exact']:.1%})")
    peak = GPU_PEAK_FLOPS[e.gpu]
    if mfu_source:
        source = f" (measured: {mfu_source})"
    else:
        source = " (default; --mfu-from a benchmark results file takes our measured MFU)" \
            if e.mfu == DEFAULT_MFU else ""
    lines.append(f"on {e.gpus} x {e.gpu} ({peak / 1e12:.0f} TFLOP/s peak each) at {e.mfu:.0%} MFU{source}:")
    lines.append(f"  GPU-hours {e.gpu_hours:,.0f}, wall time {_duration(e.wall_hours)}"
                 + (f", cost ${e.cost:,.0f} at ${e.price:g}/GPU-hour" if e.cost is not None else
                    " (give --price for the cost)"))
    mem = GPU_MEMORY_BYTES[e.gpu]
    lines.append(f"memory per GPU (data parallel; {e.gpu}: {mem / 1e9:.0f} GB), micro-batch {e.micro_batch} x "
                 f"{s.seq} tokens:")
    for mixed in (True, False):
        st = static_memory(e.n_params, mixed)
        label = "mixed precision (bf16)" if mixed else "fp32"
        detail = ", ".join(f"{k} {_gb(v)}" for k, v in st.items() if k != "total")
        lines.append(f"  {label}: {detail} = {_gb(st['total'])} ({st['total'] / e.n_params:.0f} bytes/param)")
        for ckpt in (False, True):
            act = activation_bytes_per_sequence(s, ckpt, mixed) * e.micro_batch
            total = st["total"] + act
            fits = "fits" if total <= mem else "does NOT fit"
            best = max_micro_batch(s, mem, ckpt, mixed)
            sharded = max_micro_batch(s, mem, ckpt, mixed, shards=e.gpus)
            lines.append(f"    activations {'with' if ckpt else 'without'} checkpointing {_gb(act)}; total "
                         f"{_gb(total)}: {fits} one {e.gpu}; largest micro-batch {best}"
                         + (f" ({sharded} with FSDP over {e.gpus} GPUs)" if e.gpus > 1 else ""))
    lines.append(f"Chinchilla budget (~{CHINCHILLA_TOKENS_PER_PARAM} tokens/param): {e.chinchilla_tokens:.3g} "
                 f"tokens, {e.chinchilla_flops:.3e} FLOPs (6ND); these {e.tokens:.3g} tokens are "
                 f"{e.tokens / e.chinchilla_tokens:.2f}x of it")
    return "\n".join(lines)


def plot(tokens: float, path: str, seq: int = 1024) -> str:
    """Bar chart: training FLOPs (6ND) of the four GPT-2 sizes at ``tokens``, next to their Chinchilla budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [Shape.from_preset(name, seq=seq) for name in GPT2_SIZES]
    at_tokens = [flops_per_token(sh)["6N"] * tokens for sh in shapes]
    chinchilla = [6.0 * sh.num_params() * CHINCHILLA_TOKENS_PER_PARAM * sh.num_params() for sh in shapes]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = range(len(shapes))
    ax.bar([x - 0.2 for x in xs], at_tokens, width=0.4, label=f"{tokens:.3g} tokens")
    ax.bar([x + 0.2 for x in xs], chinchilla, width=0.4, label="Chinchilla (20 tokens/param)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{n}\n{sh.num_params() / 1e6:,.0f}M" for n, sh in zip(GPT2_SIZES, shapes)])
    ax.set_yscale("log")
    ax.set_ylabel("training FLOPs (6ND)")
    ax.set_title("GPT-2 training compute")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ command
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpt2fast.compute", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl, ...)")
    p.add_argument("--n-layer", type=int, help="custom shape (overrides the preset)")
    p.add_argument("--n-embd", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--vocab", type=int, help="vocabulary size (default 50257)")
    p.add_argument("--seq", type=int, help="sequence length / context (default: the preset's, else 1024)")
    p.add_argument("--tokens", type=float, required=True, help="training tokens, e.g. 10e9")
    p.add_argument("--gpu", default="a100", help=f"one of {', '.join(k.lower() for k in GPU_PEAK_FLOPS)}")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--price", type=float, help="dollars per GPU-hour")
    mfu = p.add_mutually_exclusive_group()
    mfu.add_argument("--mfu", type=float, default=None,
                     help=f"model FLOPs utilisation (default {DEFAULT_MFU}, or --mfu-from)")
    mfu.add_argument("--mfu-from", metavar="RESULTS_JSON",
                     help="take our best measured training-step MFU from this benchmark results file")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per micro-batch (default 1)")
    p.add_argument("--plot", help="write a comparison PNG of the four GPT-2 sizes here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        custom = [args.n_layer, args.n_embd, args.n_head]
        if all(v is not None for v in custom):
            shape = Shape(args.n_layer, args.n_embd, args.n_head, vocab_size=args.vocab or 50257, seq=args.seq or 1024)
        else:
            shape = Shape.from_preset(args.model, seq=args.seq, n_layer=args.n_layer, n_embd=args.n_embd,
                                      n_head=args.n_head, vocab_size=args.vocab)
        mfu, mfu_source = (args.mfu if args.mfu is not None else DEFAULT_MFU), None
        if args.mfu_from:
            mfu, mfu_source = measured_mfu(args.mfu_from)
        e = estimate(shape, args.tokens, args.gpu, args.gpus, mfu, args.price, args.micro_batch)
        print(report(e, mfu_source))
        if args.plot:
            print(f"plot: {plot(args.tokens, args.plot, seq=args.seq or 1024)}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
