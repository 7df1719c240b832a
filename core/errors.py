"""Bad input is reported as one line that names the input and the fix, never a bare traceback."""
from __future__ import annotations

import contextlib
import sys


class ConfigError(ValueError):
    """A user-facing input error. The message names the field (or file) and says how to fix it."""


@contextlib.contextmanager
def cli_errors(prog: str):
    """Turn a ConfigError raised inside a command into `prog: error: ...` and exit status 2."""
    try:
        yield
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
