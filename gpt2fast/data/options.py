"""The options of ``prepare``, declared once.

Each field carries its help text, its command-line flag and its valid range, so the dataclass, the
``python -m gpt2fast.data prepare`` flags and the range checks cannot drift apart."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Optional, Tuple

from gpt2fast.errors import ConfigError

_Rule = Tuple[Callable[[Any], bool], str]  # (is the value valid, the rule in words for the error)


def _at_least(low) -> _Rule:
    return (lambda v: v >= low), f"at least {low}"


def _share(*, low_open: bool = False, high_open: bool = False) -> _Rule:
    def ok(v):
        return (0 < v if low_open else 0 <= v) and (v < 1 if high_open else v <= 1)
    return ok, f"in {'(' if low_open else '['}0, 1{')' if high_open else ']'}"


def _option(default, help: str, *, flag: Optional[str] = None, off: Optional[Tuple[str, str]] = None,
            rule: Optional[_Rule] = None, output: bool = True):
    """A field of ``PrepareOptions``.

    flag: the command-line spelling when it is not ``--`` + the field name in kebab case. off: (flag, help) of
    a second flag that sets the field to None. output: whether the value changes the prepared data (those
    values go into the manifest and decide whether a re-run is a no-op)."""
    return dataclasses.field(default=default,
                             metadata={"help": help, "flag": flag, "off": off, "rule": rule, "output": output})


@dataclasses.dataclass
class PrepareOptions:
    """Every knob of ``prepare`` (docs/data.md explains each rule)."""
    # The field order is the order of the manifest's "options": keep it.
    min_score: Optional[float] = _option(
        3.0, "drop documents whose 'score' is below this; documents without one pass",
        off=("--no-score-filter", "keep documents whatever their score"))
    exclude_domains: Tuple[str, ...] = _option(
        ("wikipedia.org",), "comma-separated domains whose hosts (and subdomains) are dropped; '' for none")
    min_chars: int = _option(200, "shortest cleaned document kept", rule=_at_least(0))
    max_chars: int = _option(1_000_000, "longest cleaned document kept")  # its rule needs min_chars: below
    min_letter_share: float = _option(0.6, "least share of letters among non-whitespace characters",
                                      rule=_share())
    max_dup_line_share: float = _option(0.3, "most share of characters in lines that repeat an earlier line",
                                        rule=_share())
    max_top_ngram_share: float = _option(0.2, "most share of characters in the most frequent repeated word n-gram",
                                         rule=_share())
    repetition_ngram: int = _option(3, "n of that n-gram", rule=_at_least(1))
    near_dedup: bool = _option(True, "skip near-duplicate removal")  # a flag that turns it off: --no-near-dedup
    near_dup_threshold: float = _option(
        0.8, "Jaccard similarity of word shingles from which (>=) a document is a near-duplicate; the LSH banding "
             "follows from it",
        rule=_share(low_open=True, high_open=True))
    shingle_words: int = _option(5, "words per shingle", rule=_at_least(1))
    shingle_normalize: bool = _option(True, "shingle the text as it is, not normalised (lower case, digits to 0, "
                                            "punctuation dropped) first")  # its flag: --no-shingle-normalize
    val_fraction: float = _option(0.005, "share of documents in the val split (at least one when there are two "
                                         "or more)", rule=_share(high_open=True))
    seed: int = _option(1337, "seed of the train/val split", rule=_at_least(0))
    shard_tokens: int = _option(100_000_000, "tokens per shard", rule=_at_least(1))
    workers: Optional[int] = _option(None, "worker processes (all cores if not given; with --engine ray, the "
                                           "cluster's CPUs); the output does not depend on it",
                                     rule=_at_least(1), output=False)
    engine: str = _option("local", "where the work runs: 'local' (this machine's processes) or 'ray' (a Ray "
                                   "cluster: RAY_ADDRESS, else a local Ray instance; needs gpt2fast[ray])",
                          rule=((lambda v: v in ("local", "ray")), "'local' or 'ray'"), output=False)
    batch_docs: int = _option(1000, "documents per work chunk", rule=_at_least(1), output=False)
    batch_chars: int = _option(1_000_000, "characters per work chunk", rule=_at_least(1), output=False)
    # Not an output option: a strict run that succeeds read every record, so it made what a lenient one makes.
    strict: bool = _option(False, "stop with an error at the first unreadable input record (not JSON, no string "
                                  "'text', not UTF-8, a damaged gzip) instead of skipping and counting it",
                           output=False)

    def __post_init__(self):
        self.exclude_domains = tuple(d.strip().lower().lstrip(".") for d in self.exclude_domains if d.strip())
        fields = {f.name: f for f in dataclasses.fields(self)}
        for f in fields.values():
            value, rule = getattr(self, f.name), f.metadata["rule"]
            if rule is not None and not (value is None and _may_be_none(f)) and not rule[0](value):
                raise _out_of_range(f, value, rule[1])
        if self.max_chars < max(1, self.min_chars):
            raise _out_of_range(fields["max_chars"], self.max_chars, f"at least max(1, min_chars) = "
                                                                     f"{max(1, self.min_chars)}")

    def output_options(self) -> dict:
        """The values that change the prepared data, as the manifest records them."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["output"]}
        d["exclude_domains"] = list(d["exclude_domains"])
        return d


def _may_be_none(f: dataclasses.Field) -> bool:
    return f.default is None or f.metadata["off"] is not None


def _out_of_range(f: dataclasses.Field, value, rule: str) -> ConfigError:
    return ConfigError(f"option {f.name}={value!r} ({_flag(f)}) is out of range: it must be {rule} "
                       f"(`python -m gpt2fast.data prepare --help` lists every option)")


# ---------------------------------------------------------------------------------------- command line
def _flag(f: dataclasses.Field) -> str:
    if f.metadata["flag"]:
        return f.metadata["flag"]
    kebab = f.name.replace("_", "-")
    return f"--no-{kebab}" if f.default is True else f"--{kebab}"  # a switch says what it changes


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _comma_separated(value: str) -> Tuple[str, ...]:
    return tuple(value.split(","))


def _value_type(hint) -> type:
    """int for ``int`` and ``Optional[int]``, and so on."""
    if typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One command-line flag per field (two where the field can be switched off)."""
    hints = typing.get_type_hints(PrepareOptions)
    for f in dataclasses.fields(PrepareOptions):
        flag, help, kind, default = _flag(f), f.metadata["help"], _value_type(hints[f.name]), f.default
        if kind is bool:  # a switch away from the default
            parser.add_argument(flag, dest=_dest(flag), action="store_true", help=help)
        elif kind == Tuple[str, ...]:  # argparse runs `type` on a string default too
            parser.add_argument(flag, dest=f.name, type=_comma_separated, default=",".join(default), help=help,
                                metavar=_dest(flag).upper())
        else:
            parser.add_argument(flag, dest=f.name, type=kind, help=help, metavar=_dest(flag).upper(),
                                default=argparse.SUPPRESS if default is None else default)
        if f.metadata["off"]:
            off_flag, off_help = f.metadata["off"]
            parser.add_argument(off_flag, dest=_dest(off_flag), action="store_true", help=off_help)


def from_arguments(args: argparse.Namespace) -> PrepareOptions:
    """The options that ``args`` (parsed by a parser given ``add_arguments``) spell."""
    values = {}
    for f in dataclasses.fields(PrepareOptions):
        if isinstance(f.default, bool):  # a switch: given means "not the default"
            values[f.name] = f.default != getattr(args, _dest(_flag(f)))
        elif f.metadata["off"] and getattr(args, _dest(f.metadata["off"][0])):
            values[f.name] = None
        else:
            values[f.name] = getattr(args, f.name, None)
    return PrepareOptions(**values)
