"""GPT-2 in one readable file: config presets, the model on gpt2fast's fused ops, Hugging Face weights in and
out, and sampling with a KV cache.

    from gpt2fast.model import GPT2, GPT2Config
    model = GPT2(GPT2Config.preset("gpt2"), backend="auto")     # 124M, random init
    model = GPT2.from_pretrained("path/to/hf-gpt2-folder")      # config.json + model.safetensors
    logits, loss = model(idx, targets)

The residual stream is written the pre-LayerNorm way, but the add of each sub-layer's output is fused into
the LayerNorm that follows it (``ops.layer_norm(delta, w, b, residual=h)`` returns the normalised stream
and the new stream in one pass), so a block hands the next one ``(h, pending)``: the true stream is
``h + pending``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gpt2fast import ops
from gpt2fast._io import atomic_path, checksum_entry, verify_checksums, write_atomic, write_checksums
from gpt2fast.errors import DataError

PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------------------ config
@dataclass
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # context length (Hugging Face: n_positions)
    vocab_size: int = 50257
    pad_vocab_multiple: int = 64  # embedding rows padded to a multiple of this for faster matmuls; 1: none
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0  # on embeddings and residual branches (attention-probability dropout: not supported)
    gradient_checkpointing: bool = False

    def __post_init__(self):
        for f in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "pad_vocab_multiple"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPT2Config.{f} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick n_head so "
                             f"that n_embd / n_head is a whole head size (64 in every GPT-2 size)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def preset(cls, name: str, **overrides) -> GPT2Config:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),           # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),   # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),    # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),       # 1.5B
    # small ones for CPU runs and tests
    "gpt2-mini": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "gpt2-tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
}


# ------------------------------------------------------------------------------------------ layers
class LayerNorm(nn.Module):
    def __init__(self, width: int, eps: float, backend: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.eps, self.backend = eps, backend

    def forward(self, x, residual=None):
        """LN(x) when residual is None, else (LN(x + residual), x + residual)."""
        return ops.layer_norm(x, self.weight, self.bias, residual=residual, eps=self.eps, backend=self.backend)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, backend: str):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.backend = backend

    def forward(self, x, cache: Optional[KVCache] = None, layer: int = 0):
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D), views: no copies
        if cache is None:
            y = ops.attention(q, k, v, causal=True, backend=self.backend)
        else:
            k, v = cache.append(layer, k, v)
            y = _cached_attention(q, k, v)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.dropout(self.c_proj(y))


def _cached_attention(q, k, v):
    """Attention of T new queries over all cached keys (the last T of which are the new ones)."""
    T, S = q.shape[-2], k.shape[-2]
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config, backend: str):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.backend = backend

    def forward(self, x):
        u = F.linear(x, self.c_fc.weight)  # the bias add is fused into the GELU
        return self.dropout(self.c_proj(ops.bias_gelu(u, self.c_fc.bias, backend=self.backend)))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, backend: str):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon, backend)
        self.attn = CausalSelfAttention(config, backend)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_epsilon, backend)
        self.mlp = MLP(config, backend)

    def forward(self, h, pending=None, cache=None, layer: int = 0):
        """The residual stream arrives as ``h + pending`` and leaves the same way.

        ``pending`` is the previous block's MLP output, not yet added to the stream: the add is done by this
        block's first LayerNorm, fused (``ln_1(pending, residual=h)`` returns LN(h + pending) and the new
        h = h + pending in one pass). In nanoGPT's spelling the block is
            h = h + attn(ln_1(h));  h = h + mlp(ln_2(h))
        and here each ``h + ...`` happens inside the LayerNorm after it, so this block hands its MLP output on
        as the next one's ``pending`` (the model's final ln_f adds the last one)."""
        if pending is None:  # the first block: the stream is the embeddings alone
            x = self.ln_1(h)
        else:
            x, h = self.ln_1(pending, residual=h)  # h += pending (the last block's MLP), x = LN(h)
        x, h = self.ln_2(self.attn(x, cache, layer), residual=h)  # h += attn(...), x = LN(h)
        pending = self.mlp(x)  # added to h by the next block's ln_1 (or by ln_f)
        return h, pending


# ------------------------------------------------------------------------------------------- model
class GPT2(nn.Module):
    def __init__(self, config: GPT2Config, backend: str = "auto"):
        super().__init__()
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {ops.BACKENDS}")
        self.config, self.backend = config, backend
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, backend) for _ in range(config.n_layer)),
            ln_f=LayerNorm(config.n_embd, config.layer_norm_epsilon, backend),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input and output embeddings
        self.reset_parameters()

    def reset_parameters(self):
        """GPT-2's initialisation: N(0, 0.02), zero biases, and the projections into the residual stream
        scaled by 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, residual_std)
            elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, 0.02)
        with torch.no_grad():  # padding rows are never looked up nor predicted
            self.transformer.wte.weight[self.config.vocab_size:].zero_()

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters as GPT-2 counts them: the tied embedding once, without its padding rows; with
        ``non_embedding`` the token and position embeddings are left out (the N of scaling laws)."""
        c = self.config
        total = sum(p.numel() for p in self.parameters()) - (c.padded_vocab_size - c.vocab_size) * c.n_embd
        if non_embedding:
            total -= (c.vocab_size + c.block_size) * c.n_embd
        return total

    def _trunk(self, idx, cache=None, start: int = 0):
        B, T = idx.shape
        c = self.config
        if start + T > c.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than the context "
                             f"(block_size={c.block_size}); crop the input to the last {c.block_size} tokens")
        if idx.device.type == "cpu" and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= c.vocab_size):
            bad = idx[(idx < 0) | (idx >= c.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is outside the model's vocabulary (0..{c.vocab_size - 1})")
        pos = torch.arange(start, start + T, device=idx.device)
        h = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        pending = None
        for i, block in enumerate(self.transformer.h):
            if c.gradient_checkpointing and self.training and cache is None:
                h, pending = checkpoint(block, h, pending, use_reentrant=False)
            else:
                h, pending = block(h, pending, cache, i)
        x, _ = self.transformer.ln_f(pending, residual=h)  # the last block's MLP output joins the stream here
        return x

    def forward(self, idx, targets=None, *, return_logits: bool = False, ignore_index: int = -100):
        """Returns (logits, loss). logits are (B, T, vocab_size), padding columns removed; with targets the
        loss comes from ``ops.linear_cross_entropy``, which never materialises the logits, and logits are
        None unless ``return_logits=True``."""
        x = self._trunk(idx)
        V = self.config.vocab_size
        if targets is None:
            return self.lm_head(x)[..., :V], None
        if targets.shape != idx.shape:
            raise ValueError(f"targets have shape {tuple(targets.shape)} but the input has {tuple(idx.shape)}")
        weight = self.lm_head.weight[:V]  # leading rows: contiguous, and the padding is never predicted
        loss = ops.linear_cross_entropy(x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1),
                                        ignore_index=ignore_index, backend=self.backend)
        logits = self.lm_head(x)[..., :V] if return_logits else None
        return logits, loss

    # -------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens: int, *, temperature: float = 1.0, top_k: Optional[int] = None,
                        top_p: Optional[float] = None, seed: Optional[int] = None,
                        eot_token: Optional[int] = 50256) -> Iterator[torch.Tensor]:
        """Yields the next token of each sequence, (B,), one step at a time, using a KV cache.

        temperature 0 is greedy; top_k keeps the k most likely tokens, top_p the smallest set whose
        probability reaches p. Sampling is reproducible with ``seed``. A sequence that produced
        ``eot_token`` keeps producing it; the stream ends when all have (or after max_new_tokens)."""
        if idx.dim() == 1:
            idx = idx[None]
        if idx.shape[1] == 0:
            raise ValueError("the prompt is empty: give at least one token (e.g. the <|endoftext|> id)")
        if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
            raise ValueError(f"need temperature >= 0, top_k >= 1 and 0 < top_p <= 1; got temperature="
                             f"{temperature}, top_k={top_k}, top_p={top_p}")
        was_training = self.training
        self.eval()
        generator = None
        if seed is not None:
            generator = torch.Generator(device=idx.device)
            generator.manual_seed(seed)
        window = self.config.block_size
        context = idx[:, -window:]
        cache = KVCache(self, idx.shape[0], idx.device)
        logits = self._trunk_logits(context, cache)
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        try:
            for _ in range(max_new_tokens):
                nxt = _sample(logits, temperature, top_k, top_p, generator)
                if eot_token is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eot_token), nxt)
                    done |= nxt == eot_token
                yield nxt
                if eot_token is not None and bool(done.all()):
                    return
                context = torch.cat([context, nxt[:, None]], dim=1)[:, -window:]
                if cache is not None and cache.length < window:
                    logits = self._trunk_logits(nxt[:, None], cache)
                else:
                    # The context is full. The usual rule (nanoGPT's, Hugging Face's) conditions every token on
                    # the last block_size tokens, and with learned absolute positions a cached key cannot move
                    # to another position: so from here on each step runs the whole window again, uncached.
                    cache = None
                    logits = self.lm_head(self._trunk(context)[:, -1]).float()[:, :self.config.vocab_size]
        finally:
            self.train(was_training)

    def generate(self, idx, max_new_tokens: int, **sampling) -> torch.Tensor:
        """The prompt followed by up to max_new_tokens sampled tokens, (B, T + n). See generate_stream."""
        if idx.dim() == 1:
            idx = idx[None]
        new = list(self.generate_stream(idx, max_new_tokens, **sampling))
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx

    def _trunk_logits(self, idx, cache: KVCache):
        start = cache.length
        x = self._trunk(idx, cache, start)
        return self.lm_head(x[:, -1]).float()[:, :self.config.vocab_size]

    # ------------------------------------------------------------------ Hugging Face weights
    @classmethod
    def from_pretrained(cls, path: PathLike, backend: str = "auto", **config_overrides) -> GPT2:
        """Load a Hugging Face GPT-2 checkpoint from a local folder (config.json and model.safetensors or
        pytorch_model.bin), or one written by ``save_pretrained``."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: from_pretrained needs a folder with config.json "
                                    f"and model.safetensors (or pytorch_model.bin)")
        # a folder we wrote lists its files' checksums: a damaged file is named here, not met as wrong weights
        verify_checksums(path, ["config.json", "model.safetensors", "pytorch_model.bin"])
        try:
            hf = json.loads(config_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{config_file} is not valid JSON ({e}): is the folder damaged?") from None
        if not isinstance(hf, dict):
            raise DataError(f"{config_file} is not a JSON object of GPT-2 settings")
        config = _config_from_hf(hf, config_file, **config_overrides)
        state = _load_hf_state(path)
        model = cls(config, backend=backend)
        model.load_hf_state_dict(state, source=str(path))
        return model

    def load_hf_state_dict(self, state: dict, source: str = "state dict") -> None:
        """Copy Hugging Face GPT-2 weights (Conv1D layout, with or without the 'transformer.' prefix)."""
        state = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in state.items()}
        ignorable = (".attn.bias", ".attn.masked_bias")
        c = self.config
        expected = dict(self.transformer.named_parameters())
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected and not k.endswith(ignorable) and k != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"{source}: the weights do not fit a GPT-2 of this shape; missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{'...' if len(unexpected) > 5 else ''}")
        with torch.no_grad():
            for name, param in expected.items():
                src = state[name]
                if name.endswith(_CONV1D_WEIGHTS):
                    src = src.t()
                target = param[:c.vocab_size] if name == "wte.weight" else param
                if tuple(src.shape) != tuple(target.shape):
                    raise ValueError(f"{source}: {name} has shape {tuple(src.shape)}, this model expects "
                                     f"{tuple(target.shape)}; is the checkpoint of another model size?")
                target.copy_(src)
            self.transformer.wte.weight[c.vocab_size:].zero_()

    def hf_state_dict(self) -> dict:
        """The weights in Hugging Face's GPT2LMHeadModel layout (Conv1D weights, no padding rows)."""
        out = {}
        for name, param in self.transformer.named_parameters():
            t = param.detach()
            if name == "wte.weight":
                t = t[:self.config.vocab_size]
            if name.endswith(_CONV1D_WEIGHTS):
                t = t.t()
            out["transformer." + name] = t.contiguous().cpu().clone()
        return out

    def save_pretrained(self, path: PathLike) -> Path:
        """Write config.json and model.safetensors that transformers' GPT2LMHeadModel loads."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_atomic(path / "config.json", json.dumps(_config_to_hf(self.config), indent=2).encode("utf-8"))
        with atomic_path(path / "model.safetensors") as tmp:
            save_file(self.hf_state_dict(), str(tmp), metadata={"format": "pt"})
        # written last: checksums of both files, which from_pretrained checks (transformers ignores the file)
        write_checksums(path, {name: checksum_entry(path / name) for name in ("config.json", "model.safetensors")})
        return path


_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to the context length."""

    def __init__(self, model: GPT2, batch: int, device):
        c = model.config
        dtype = model.transformer.wte.weight.dtype
        shape = (c.n_layer, batch, c.n_head, c.block_size, c.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0  # tokens cached in every layer

    def append(self, layer: int, k, v):
        end = self.length + k.shape[-2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        out = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        if layer == self.k.shape[0] - 1:  # the last layer closes the step
            self.length = end
        return out


def _sample(logits, temperature, top_k, top_p, generator):
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the most likely one always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------ Hugging Face config
def _config_from_hf(hf: dict, source, **overrides) -> GPT2Config:
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{source}: model_type is {hf.get('model_type')!r}, not 'gpt2'")
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise ValueError(f"{source}: n_inner={hf['n_inner']} is not supported (GPT-2 uses 4 * n_embd)")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{source}: activation_function={hf['activation_function']!r} is not GPT-2's tanh GELU")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(flag):
            raise ValueError(f"{source}: {flag}=true is not supported")
    if hf.get("scale_attn_weights", True) is False:
        raise ValueError(f"{source}: scale_attn_weights=false is not supported")
    kwargs = dict(n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
                  block_size=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257),
                  layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def _config_to_hf(c: GPT2Config) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size,
        "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": c.layer_norm_epsilon,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": 0.0,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
        "bos_token_id": min(50256, c.vocab_size - 1), "eos_token_id": min(50256, c.vocab_size - 1), "use_cache": True,
    }


def _load_hf_state(path: Path) -> dict:
    st = path / "model.safetensors"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except SafetensorError as e:  # a truncated or overwritten file: safetensors' message names no file
            raise DataError(f"{st} is not a readable safetensors file ({e}): the file is damaged or incomplete; "
                            f"copy it again from its source") from None
    pt = path / "pytorch_model.bin"
    if pt.is_file():
        import pickle

        try:
            # weights_only: torch's restricted unpickler, which refuses any pickle that would run code
            return torch.load(pt, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise DataError(f"{pt} was not loaded: it is damaged, or a pickle that would run code when loaded "
                            f"(refused: {' '.join(str(e).split())[:300]}); use a model.safetensors of these weights "
                            f"from a source you trust") from None
    raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
