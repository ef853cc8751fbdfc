"""Fused ops for GPT-2, one per module, each with a plain-PyTorch reference beside its fast paths.

    from gpt2fast import ops
    y, h = ops.layer_norm(x, weight, bias, residual=h)      # residual add fused in
    a = ops.bias_gelu(x, bias)                              # tanh GELU of x + bias
    o = ops.attention(q, k, v, causal=True)                 # flash-style, (B, H, T, D)
    loss = ops.cross_entropy(logits, targets)               # fused softmax + loss + gradient
    loss = ops.linear_cross_entropy(hidden, weight, targets)  # never materialises all the logits

Every op takes backend="auto" | "cuda" | "triton" | "torch"; see gpt2fast/ops/_dispatch.py. A backend asked for
by name that cannot run here raises ``BackendUnavailable``. The fused AdamW is gpt2fast.ops.adamw.AdamW.
"""
from gpt2fast.ops._dispatch import BACKENDS, BackendUnavailable
from gpt2fast.ops.attention import attention
from gpt2fast.ops.bias_gelu import bias_gelu
from gpt2fast.ops.cross_entropy import cross_entropy, linear_cross_entropy
from gpt2fast.ops.layer_norm import layer_norm

__all__ = ["BACKENDS", "BackendUnavailable", "attention", "bias_gelu", "cross_entropy", "layer_norm",
           "linear_cross_entropy"]
