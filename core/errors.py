"""Bad input, a failed write and an interrupt are each reported as one line (what, and the fix),
never a bare traceback: `cli_errors` wraps every command. docs/runtime.md ("Bad input", "Faults")."""
from __future__ import annotations

import contextlib
import errno
import sys

from .interrupts import clean_exit

# a write that fails for one of these is the disk's fault, not the program's: one line, not a traceback
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ELOOP, errno.EIO, errno.EFBIG)


class ConfigError(ValueError):
    """A user-facing input error. The message names the field (or file) and says how to fix it."""


class WriteError(Exception):
    """A result could not be written where asked; the message (one line) says where it was kept
    instead (`kept`), or carries it."""

    def __init__(self, message: str, kept=None):
        super().__init__(message)
        self.kept = kept


@contextlib.contextmanager
def cli_errors(prog: str, resume: str | None = None):
    """Inside a command: a ConfigError is `prog: error: ...` and exit status 2; a WriteError or a
    disk's OSError (full, read-only, a link loop) `prog: error: ...` and exit 1; Ctrl-C / SIGTERM
    one line saying what was written and how to resume (`resume`, default: run it again), exit
    130 / 143 (core/interrupts.py)."""
    with clean_exit(prog, resume):
        try:
            yield
        except ConfigError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except WriteError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        except OSError as e:
            if e.errno not in DISK_ERRNOS:
                raise
            print(f"{prog}: error: {e.filename or 'a file'}: {e.strerror or e}; free some space or fix the path, "
                  "or point the command at another folder", file=sys.stderr)
            raise SystemExit(1) from None


def check_file(path, where: str, is_dir: str, missing: str, error: type[ConfigError] = ConfigError) -> None:
    """An input file (a pathlib.Path) is there and is a file, else one line: '<where> is a
    directory; <is_dir>' or '<where>: <missing>'."""
    if path.is_dir():
        raise error(f"{where} is a directory; {is_dir}")
    if not path.is_file():
        raise error(f"{where}: {missing}")
