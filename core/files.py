"""Where results go and how they get there: atomic writes, the results folder checked before a run
(it resolves, takes a file, has room for what the run will write) and the fallback after one
(a write that fails keeps the measurement in `<cache>/unsaved/`, or in the error line itself).

core/results.py re-exports these names; the record they write is its business. What a user sees
when a disk is full, a path is a dangling link or a run is killed: docs/runtime.md ("Faults").
"""
from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, TextIO

from .errors import ConfigError, WriteError
from .interrupts import note_written

ORPHAN_AGE_S = 3600.0     # a temp file this old is from a killed write (a write takes milliseconds)
MIN_ROOM = 1 << 20        # kept free on a disk beyond what a run writes: a margin, not a need
RECORD_BYTES = 32 << 10   # a result record without its per-request rows (the config, phases, provenance)
REQUEST_BYTES = 512       # one per_request row of indented JSON
EVENT_BYTES = 256         # one Chrome trace event of indented JSON
ROW_BYTES = 128           # one row of a time series CSV (at most one per token event)
MAX_TIMELINE_EVENTS = 250_000   # simulator.run caps its op events at 200,000


# ----------------------------------------------------------------------------- before a run

def results_folder(results_dir, kind: str, need: int = RECORD_BYTES) -> Path:
    """`<results_dir>/<kind>`, checked before a run: it resolves, takes a file and has `need`
    bytes free and MIN_ROOM more (an empty results_dir is refused, not read as the current folder)."""
    if results_dir is None or not str(results_dir).strip():
        raise ConfigError(f"results_dir={results_dir!r} is empty; set results_dir=PATH (default: results)")
    return check_writable(Path(str(results_dir)) / kind, need=need)


def check_writable(folder: str | Path, field: str = "results_dir", need: int = 0) -> Path:
    """Before a run: every part of `folder`'s path resolves (no dangling symlink, no loop), the
    folder (or, if it does not exist yet, its deepest existing parent, which the run will create
    it in) takes a file, and its disk has `need` bytes free (need > 0: and MIN_ROOM more); else a
    one-line ConfigError naming `field`, so a measurement is never taken only to be lost when its
    result cannot be written."""
    folder = Path(folder)
    for p in reversed([folder, *folder.parents]):
        if p.is_symlink() and not p.exists():
            try:
                os.stat(p)
                why = "cannot be followed"
            except OSError as e:
                why = ("is a symlink loop" if e.errno == errno.ELOOP
                       else f"is a dangling symlink (to {os.readlink(p)}, which does not exist)")
            raise ConfigError(f"{field}: {p} {why}; fix or remove the link, or set {field}=/a/writable/folder")
    existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        where = "" if existing == folder else f" (on the way to {folder})"
        raise ConfigError(f"{field}: {existing} is a file, not a folder{where}; move it or set "
                          f"{field}=/a/writable/folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{field}: {folder} is not writable ({e.strerror or e} in {existing}); fix its "
                          f"permissions or set {field}=/a/writable/folder") from None
    check_room(existing, need, field, folder)
    if existing == folder:
        clean_orphans(folder)
    return folder


def check_room(existing: Path, need: int, field: str, folder: Path | None = None) -> None:
    """`existing`'s disk has `need` bytes and MIN_ROOM more free for a non-root user, else one
    ConfigError line."""
    if need <= 0:
        return
    free = shutil.disk_usage(existing).free
    if free < need + MIN_ROOM:
        raise ConfigError(f"{field}: {folder or existing} has {size(free)} free on its disk; this run writes about "
                          f"{size(need)} and leaves {size(MIN_ROOM)} free; free some space or set "
                          f"{field}=/a/folder/with/room")


def run_bytes(cfg) -> int:
    """What one run of `cfg` writes, from its config: the result record and its requests CSV (a
    row per request each), with timeseries=true its time series, with timeline=true its Chrome
    trace (events per step from the model's layers, steps from the requests' tokens). An upper
    estimate: the check before a run compares it with the free space."""
    w = cfg.get("workload") or {}
    arrival = w.get("arrival", "static") or "static"
    requests = int(w.get("batch", 1) or 1) if arrival == "static" else int(w.get("n_requests", 1) or 1)
    if arrival == "trace" and w.get("trace"):
        try:
            with open(str(w.get("trace")), "rb") as f:
                requests = sum(1 for _ in f)
        except OSError:
            pass
    n = RECORD_BYTES + requests * REQUEST_BYTES * 2          # per-request rows in the record and its requests CSV
    if cfg.get("timeseries", False):
        n += 2 * requests * int(w.get("gen_len", 1) or 1) * ROW_BYTES
    if cfg.get("timeline", False):
        args = (cfg.get("model") or {}).get("args") or {}
        per_step = 6 * int(args.get("n_layers", 32) or 32) + 16
        steps = (int(w.get("gen_len", 1) or 1) + 1) * max(int(cfg.get("repeats", 1) or 1), 1)
        steps *= 1 if arrival == "static" else requests
        n += (min(steps * per_step, MAX_TIMELINE_EVENTS) + 4 * requests) * EVENT_BYTES
    return n


def check_room_for(cfg) -> None:
    """Before a run's work, after its config and feasibility checks: its results folder has room
    for what it will write (run_bytes)."""
    if cfg.get("results_dir") is not None:
        results_folder(cfg.results_dir, "", need=run_bytes(cfg))


def check_results(cfgs, multirun: bool = False, hydra_need: int = 64 << 10) -> None:
    """Before Hydra writes anything: every results_dir of a command's points (`cfgs`, composed with
    their hydra node) resolves, takes a file and has room for all its points' writes together;
    Hydra's own output folder (hydra.run.dir / hydra.sweep.dir) resolves and has a little room."""
    need: dict[str, int] = {}
    for c in cfgs:
        if c.get("results_dir") is not None:
            # one run: the floor here; its whole estimate after its own checks (check_room_for), so an
            # infeasible config is refused for what it is, not for the disk it would have filled
            n = run_bytes(c) if multirun else RECORD_BYTES
            need[str(c.results_dir)] = need.get(str(c.results_dir), 0) + n
    for rdir, n in need.items():
        results_folder(rdir, "", need=n)
    for c in cfgs[:1]:
        try:
            out = str(c.hydra.sweep.dir if multirun else c.hydra.run.dir)
        except Exception:              # a resolver not registered yet: Hydra reports its own folder
            continue
        check_writable(Path(out), "hydra.sweep.dir" if multirun else "hydra.run.dir", need=hydra_need)


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ----------------------------------------------------------------------------- after a run

def unsaved_folder() -> Path:
    """`<cache root>/unsaved`: where a result goes when its own folder cannot take it."""
    from .machine import cache_root

    return cache_root(create=False) / "unsaved"


def keep_unsaved(path: Path, record: dict, error: OSError, rewrite: Callable[[Path], Path]) -> WriteError:
    """`record` could not be written to `path`: `rewrite(<cache>/unsaved/<name>)` writes it (and
    the files beside it: timeline, requests CSV) there instead, and the one-line WriteError names
    that file; if that fails too, the error carries the record itself as compact JSON. Nothing
    measured is lost either way."""
    why = f"cannot write {getattr(error, 'filename', None) or path} ({error.strerror or error})"
    keep = unsaved_folder() / path.name
    side = lambda: [k for k, v in record.items() if k.endswith("_path") and isinstance(v, str)  # noqa: E731
                    and Path(v).parent in (path.parent, keep.parent)]
    try:
        written = rewrite(keep)
        record["path"] = str(written)
        beside = side()
        return WriteError(f"{why}; the result is kept in {written}" + (f" (with {', '.join(beside)} beside it)"
                          if beside else "") + f"; move it to {path.parent} once there is room", kept=written)
    except (OSError, ConfigError) as e2:
        for k in side():                # files beside it that were not written either
            record.pop(k)
        text = json.dumps(record, separators=(",", ":"), default=str, allow_nan=True)
        return WriteError(f"{why}, nor {keep} ({getattr(e2, 'strerror', None) or e2}); the result: {text}")


def write_kept(path: str | Path, write: Callable[[TextIO], object]) -> Path:
    """`write_atomic(path, write)` for a table of measurements (analysis.validate's and
    analysis.sweep's CSVs): if it fails, the same text goes to `<cache>/unsaved/<name>` and a
    one-line WriteError names it; if that fails too, the error carries the text (as a JSON string)."""
    path = Path(path)
    try:
        return write_atomic(path, write)
    except OSError as e:
        why = f"cannot write {e.filename or path} ({e.strerror or e})"
        buf = io.StringIO()
        write(buf)
        keep = unsaved_folder() / path.name
        try:
            written = write_atomic(keep, lambda f: f.write(buf.getvalue()))
        except (OSError, ConfigError) as e2:
            raise WriteError(f"{why}, nor {keep} ({getattr(e2, 'strerror', None) or e2}); the table: "
                             f"{json.dumps(buf.getvalue())}") from None
        raise WriteError(f"{why}; the table is kept in {written}; move it to {path} once there is room",
                         kept=written) from None


# ----------------------------------------------------------------------------- writing

@contextlib.contextmanager
def flocked(lock: str | Path) -> Iterator[None]:
    """Hold an exclusive flock on the file `lock` (made, with its folder, if missing): one holder at
    a time across processes, released when the holder exits, even by kill -9. The lock is a file of
    its own, never the data it guards (an atomic replace swaps that file)."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def append_csv_row(path: Path, row: dict) -> None:
    """Append `row` (a header first when the file is empty) to a CSV that several processes append
    to: one writer at a time (flock), the row's bytes in one go; a write that fails (a full disk)
    takes back what it wrote, and an empty file it made, before the OSError goes on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab", buffering=0) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            start = os.fstat(f.fileno()).st_size
            buf = io.StringIO(newline="")
            w = csv.DictWriter(buf, fieldnames=list(row))
            if start == 0:
                w.writeheader()
            w.writerow(row)
            data = memoryview(buf.getvalue().encode())
            try:
                while data:
                    data = data[os.write(f.fileno(), data):]
            except OSError:
                os.ftruncate(f.fileno(), start)
                if start == 0:
                    path.unlink(missing_ok=True)
                raise
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    note_written(path)


def clean_orphans(folder: str | Path, max_age_s: float = ORPHAN_AGE_S) -> list[Path]:
    """Remove `.<name>.<random>.tmp` files older than `max_age_s` that a killed atomic write left in
    `folder` (readers ignore them anyway: they never end in .json); returns what was removed."""
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if e.name.startswith(".") and e.name.endswith(".tmp") and e.is_file(follow_symlinks=False):
            try:
                if now - e.stat(follow_symlinks=False).st_mtime > max_age_s:
                    os.unlink(e.path)
                    removed.append(Path(e.path))
            except OSError:
                pass            # another process removed or renamed it first
    return removed


def write_json_atomic(path: str | Path, obj, *, exclusive: bool = False) -> Path:
    """`obj` as indented JSON, written by `write_atomic` (exclusive: see there)."""
    def dump(f):
        json.dump(obj, f, indent=2, allow_nan=True, default=str)
        f.write("\n")
    return write_atomic(path, dump, exclusive=exclusive)


def write_atomic(path: str | Path, write: Callable[[TextIO], object], *, exclusive: bool = False) -> Path:
    """Call `write(f)` on a temp file in the same folder, fsync, then rename over `path`:
    a reader never sees half a file and a crash never leaves one (a killed process may leave a
    hidden `.<name>.*.tmp`, which the next write in that folder removes once it is an hour old;
    a failed write, ENOSPC included, removes its temp file before the OSError goes on).

    exclusive=True never replaces an existing file: if `path` exists (the same config in the same
    second, written by another run) the file goes to `<stem>-2<suffix>`, `-3`, ... and that path is
    returned."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)          # mkstemp makes 0600; results and profiles are for sharing
        if exclusive:
            path = _link_new(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    note_written(path)
    clean_orphans(path.parent)
    return path


def _link_new(tmp: str, path: Path) -> Path:
    """Give the finished temp file a name nobody holds: a hard link fails if the name exists
    (atomic, never clobbers); then the temp name goes."""
    for i in range(1, 10_000):
        cand = path if i == 1 else path.with_name(f"{path.stem}-{i}{path.suffix}")
        try:
            os.link(tmp, cand)
        except FileExistsError:
            continue
        except OSError:                  # a file system without hard links: claim the name, then replace it
            try:
                os.close(os.open(cand, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                continue
            os.replace(tmp, cand)
            return cand
        os.unlink(tmp)
        return cand
    raise FileExistsError(f"{path}: 10,000 results of that name already; clear the folder")
