"""How a command ends when it cannot go on: Ctrl-C (SIGINT), SIGTERM, or a multirun that can no
longer write. Always one line on stderr saying what was written and how to resume, never a
traceback; exit status 128 + the signal (130, 143) for an interrupt, 1 for a sweep that stops.

`clean_exit(prog)` wraps a command (core/errors.py cli_errors and core/cli.py hydra_entry use it);
`note_written` is called by every atomic write (core/files.py), `at_point` by each multirun point
(core/cli.py run_point), so the line can name what is on disk. docs/runtime.md ("Faults").
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path

_WRITTEN: list[Path] = []          # files this process finished writing, in order
_POINT: dict = {}                  # the multirun point now running: csv, job, overrides


class Interrupted(BaseException):
    """SIGTERM (or another signal) turned into an exception, so `finally` blocks run as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def note_written(path) -> None:
    _WRITTEN.append(Path(path))


def at_point(csv: Path, job: int, overrides: list[str]) -> None:
    """A multirun point starts: its sweep CSV, job number and overrides (for the closing line)."""
    _POINT.update(csv=Path(csv), job=job, overrides=" ".join(overrides))


def _raise(signum, frame):
    raise Interrupted(signum)


def csv_rows(path: Path) -> int:
    """Data rows of a sweep CSV (0 when it is missing or empty)."""
    try:
        with open(path, "rb") as f:
            return max(sum(1 for line in f if line.strip()) - 1, 0)
    except OSError:
        return 0


def written_text(limit: int = 3) -> str:
    seen = list(dict.fromkeys(str(p) for p in _WRITTEN))
    if not seen:
        return "nothing was written (a result is written when its run ends)"
    more = f" and {len(seen) - limit} more" if len(seen) > limit else ""
    return "written: " + ", ".join(seen[-limit:]) + more


def sweep_text() -> str:
    """The multirun point now running, and where the finished points are."""
    csv, job = _POINT["csv"], _POINT["job"]
    n = csv_rows(csv)
    where = f"{n} finished point{'s are rows' if n != 1 else ' is a row'} of {csv}" if n else "no point recorded yet"
    return f"point {job} ({_POINT['overrides']}) of the multirun; {where}"


def interrupted_line(prog: str, signum: int, resume: str | None = None) -> str:
    name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else f"signal {signum}"
    if _POINT:
        how = resume or "run the points missing from the sweep CSV again (a multirun does not resume)"
        return f"{prog}: interrupted ({name}) at {sweep_text()}; {how}"
    said = [written_text()] if _WRITTEN or not resume else []     # a command that resumes names its own files
    return "; ".join([f"{prog}: interrupted ({name})", *said, resume or "run the same command again"])


def stop_sweep(prog: str, why: str, code: int = 1):
    """A multirun point cannot record itself (no room, no CSV, its result not written where asked):
    one line naming the point, why, and where the finished points are; the other points do not run."""
    print(f"{prog}: error: multirun stopped at {sweep_text()}: {why}", file=sys.stderr, flush=True)
    raise SystemExit(code)


@contextlib.contextmanager
def stops_sweep(prog: str, code: int = 1, detail: str = "", then: str | None = None):
    """Around a multirun point's check or CSV row: an OSError or a ValueError (a core.errors
    ConfigError) inside stops the sweep (`stop_sweep`, with `detail` after the reason); `then`:
    stop after the block even when it succeeds (the point's result went elsewhere: the next one's
    would too)."""
    try:
        yield
    except (OSError, ValueError) as e:
        why = (f"cannot write {e.filename or 'its row'} ({e.strerror or e})" if isinstance(e, OSError)
               else str(e))
        stop_sweep(prog, "; ".join(x for x in (why, then or detail) if x), code)
    if then:
        stop_sweep(prog, then, code)


@contextlib.contextmanager
def clean_exit(prog: str, resume: str | None = None):
    """Inside: SIGTERM raises Interrupted (the main thread only; elsewhere signals are left alone).
    Ctrl-C or SIGTERM: `finally` blocks run, then one line (`interrupted_line`) and exit 130 / 143."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.getsignal(signal.SIGTERM) if main else None
    old_int = signal.getsignal(signal.SIGINT) if main else None
    if main:
        signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    except (KeyboardInterrupt, Interrupted) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if main:                           # a second Ctrl-C while the line is written is ignored
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(interrupted_line(prog, int(signum), resume), file=sys.stderr, flush=True)
        raise SystemExit(128 + int(signum)) from None
    finally:
        if main and old is not None:
            signal.signal(signal.SIGTERM, old)
        if main and old_int is not None:
            signal.signal(signal.SIGINT, old_int)
