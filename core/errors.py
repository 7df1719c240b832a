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


def check_file(path, where: str, is_dir: str, missing: str, error: type[ConfigError] = ConfigError) -> None:
    """An input file (a pathlib.Path) is there and is a file, else one line: '<where> is a
    directory; <is_dir>' or '<where>: <missing>'."""
    if path.is_dir():
        raise error(f"{where} is a directory; {is_dir}")
    if not path.is_file():
        raise error(f"{where}: {missing}")
