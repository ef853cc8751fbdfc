"""gpt2fast.ops without Triton installed: every op imports, "auto" falls back to its reference with a
warning, and "triton" says Triton is not importable."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO

SCRIPT = """
import sys, warnings
sys.modules['triton'] = None  # `import triton` now raises ImportError
import torch
from gpt2fast import ops
from gpt2fast.ops.bias_gelu import bias_gelu_reference
from gpt2fast.ops.cross_entropy import cross_entropy_reference, linear_cross_entropy_reference
from gpt2fast.ops.layer_norm import layer_norm_reference
from gpt2fast.ops.attention import attention_reference

x, b, w = torch.randn(3, 8), torch.randn(8), torch.randn(8)
q = k = v = torch.randn(1, 2, 5, 32)
t = torch.tensor([1, 2, 3])
cases = {
    "bias_gelu": (lambda be: ops.bias_gelu(x, b, backend=be), lambda: bias_gelu_reference(x, b)),
    "layer_norm": (lambda be: ops.layer_norm(x, w, b, backend=be), lambda: layer_norm_reference(x, w, b)),
    "attention": (lambda be: ops.attention(q, k, v, backend=be), lambda: attention_reference(q, k, v)),
    "cross_entropy": (lambda be: ops.cross_entropy(x, t, backend=be), lambda: cross_entropy_reference(x, t)),
    "linear_cross_entropy": (lambda be: ops.linear_cross_entropy(x, torch.randn(8, 8), t, backend=be), None),
}
for name, (run, reference) in cases.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run("auto")
    assert any("not importable" in str(c.message) for c in caught), (name, [str(c.message) for c in caught])
    if reference is not None:
        assert torch.allclose(out, reference()), name
    try:
        run("triton")
    except RuntimeError as e:
        assert "not importable" in str(e), (name, e)
    else:
        raise AssertionError(f"{name}: backend='triton' did not raise")
print("ok")
"""


def test_every_op_falls_back_without_triton():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
