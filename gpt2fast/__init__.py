"""gpt2fast: train and study GPT-2 with native hot paths.

Importing the package is cheap: submodules (and torch, for the parts that need it) load on first use.
"""
from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "Tokenizer": ("gpt2fast.tokenizer", "Tokenizer"),
    "StreamDecoder": ("gpt2fast.tokenizer", "StreamDecoder"),
    "GPT2": ("gpt2fast.model", "GPT2"),
    "GPT2Config": ("gpt2fast.model", "GPT2Config"),
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gpt2fast' has no attribute {name!r}")
