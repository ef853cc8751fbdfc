"""The project's own errors about what a user gave it: a setting, a file, a value.

Each message names the file or setting, the value and the fix. The command lines print these as one line and
exit 2; every other exception (a CUDA failure, a bug of ours) keeps its traceback."""
from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user. A ValueError, so code that caught ValueError before still does."""


class ConfigError(InputError):
    """A bad setting: a flag, a config file's field, a preset name."""


class DataError(InputError):
    """A bad input or data file: unreadable, malformed, of another format or version."""
