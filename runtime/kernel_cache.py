"""Compiled C kernels and their folder, `<cache root>/kernels/`: how a library is built, what is
trusted there, who builds it, and what is left behind (`load_library`).

- A library `<name>-<shape>-<key>.so` (key: a hash of source, flags, compiler and CPU) is trusted
  only when its stamp `<same>.json` names that key and the sha256 of the library's bytes
  (`verify`); anything else (another key's file copied over it, a truncated or garbage file, no
  stamp) is rebuilt with one line on stderr, never loaded.
- One builder per key at a time (`locked`: an flock on `<same>.lock`); a second process waits,
  then finds the library built.
- A build runs in `tmp-<same>-*/` and is renamed into place with its stamp (`install`); a killed
  build's folder is removed by the next process that uses the folder (`remove_orphans`: folders
  older than ORPHAN_AGE_S, or of a key whose lock is free).

`python -m runtime.cache` lists and clears the folder (`entries`, `clear`). Why the kernels are
cached and keyed: docs/policies.md (fused low-bit CPU kernels), docs/profiles.md (the cache root).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core.files import flocked

try:
    import fcntl
except ImportError:          # no flock (Windows): builders are not serialised, the rename stays atomic
    fcntl = None

ORPHAN_AGE_S = 600.0         # a build folder this old is a killed build's (a build times out at 300 s)
PART = "kernels"
builds = 0                   # libraries compiled by this process (tests: none inside a timed region)
_swept = False               # orphaned build folders looked for once per process


def folder(create: bool = True) -> Path:
    from core.machine import cache_root

    path = cache_root(create) / PART
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def stamp_path(lib: Path) -> Path:
    return lib.with_suffix(".json")


def lock_path(lib: Path) -> Path:
    return lib.with_suffix(".lock")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(lib: Path, key: str) -> str | None:
    """None when `lib` is the library its name promises (its stamp names `key` and the sha256 of
    its bytes); else why not, in a few words ("missing" when there is no file)."""
    if not lib.is_file():
        return "missing"
    try:
        meta = json.loads(stamp_path(lib).read_text())
    except FileNotFoundError:
        return "it has no stamp"
    except (OSError, ValueError):
        return "its stamp is unreadable"
    if not isinstance(meta, dict) or meta.get("key") != key:
        got = meta.get("key") if isinstance(meta, dict) else None
        return f"its stamp names key {got!r}, not {key!r}"
    try:
        digest = sha256_file(lib)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if digest != meta.get("sha256"):
        return "its sha256 is not the one its stamp records: replaced, truncated or damaged"
    return None


def say_rebuilding(lib: Path, why: str) -> None:
    print(f"kvtestbed: compiled kernel {lib} does not match its name ({why}); rebuilding it", file=sys.stderr)


@contextlib.contextmanager
def locked(lib: Path):
    """Hold the build lock of `lib`'s key (blocks while another process builds it)."""
    if fcntl is None:
        yield
        return
    with flocked(lock_path(lib)):
        yield


def _is_locked(lock: Path) -> bool:
    """Whether another process holds the flock on `lock` now."""
    if fcntl is None or not lock.is_file():
        return False
    try:
        with open(lock, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        return False
    return False


def _build_prefix(lib: Path) -> str:
    return f"tmp-{lib.stem}-"


def _owner_lock(build_dir: Path, root: Path) -> Path | None:
    """The lock of the key a `tmp-<stem>-*` build folder belongs to (None for other tmp* names)."""
    name = build_dir.name
    if not name.startswith("tmp-"):
        return None
    stem = name[4:].rsplit("-", 1)[0]
    return root / f"{stem}.lock"


def remove_orphans(root: Path, max_age_s: float = ORPHAN_AGE_S, now: float | None = None) -> list[Path]:
    """Delete what killed builds left in `root`: `tmp*` folders older than `max_age_s`, or whose
    key's lock nobody holds (no build of that key is running), and hidden `.*.tmp` stamp writes
    older than `max_age_s`. Returns what was removed."""
    now = time.time() if now is None else now
    gone: list[Path] = []
    if not root.is_dir():
        return gone
    for p in root.iterdir():
        try:
            age = now - p.stat().st_mtime
        except OSError:
            continue
        if p.is_dir() and p.name.startswith("tmp"):
            owner = _owner_lock(p, root)
            idle = owner is not None and not _is_locked(owner)
            if age > max_age_s or idle:
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
        elif p.is_file() and p.name.startswith(".") and p.name.endswith(".tmp") and age > max_age_s:
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


@contextlib.contextmanager
def build_dir(lib: Path):
    """A fresh `tmp-<stem>-*` folder beside `lib` for one build, removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix=_build_prefix(lib), dir=lib.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install(built: Path, lib: Path, key: str, info: dict) -> None:
    """Move a freshly built library into place as `lib`, then write its stamp (key, sha256 and
    `info`), each atomically; a reader between the two sees a stale stamp and waits on the lock."""
    from core.results import write_json_atomic

    digest = sha256_file(built)
    stamp_path(lib).unlink(missing_ok=True)
    os.replace(built, lib)
    write_json_atomic(stamp_path(lib), {"key": key, "sha256": digest, **info})


# ----------------------------------------------------------------------------- build and load

def cpu_key() -> str:
    """The CPU a library is built for (-march=native): model name and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    # x86 names the CPU in "model name" / "flags"; arm64 in "CPU implementer" / "CPU part" / "Features"
    keys = ("model name", "flags", "Features", "CPU implementer", "CPU architecture", "CPU variant", "CPU part")
    keep = sorted({ln.strip() for ln in lines if ln.startswith(keys)})
    return "\n".join([platform.machine(), platform.processor(), *keep])


def compiler() -> tuple[str, str]:
    """($CC, else cc, else gcc; its --version), or RuntimeError."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (set CC, or install gcc)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cc} --version failed: {e}") from None
    return cc, version


def library_path(name: str, source: str, flags: list[str], defs: dict) -> tuple[Path, str, list[str], str]:
    """(`<folder>/<name>-<key>.so`, key, the -D flags, the compiler): the key hashes source, flags
    and defines, the compiler's version and the CPU."""
    cc, version = compiler()
    dflags = [f"-D{k}={v}" for k, v in defs.items()]
    key = hashlib.sha256("\0".join([source, " ".join(flags + dflags), version, cpu_key()]).encode()).hexdigest()[:16]
    return folder() / f"{name}-{key}.so", key, dflags, cc


def _compile(lib: Path, key: str, source: str, flags: list[str], cc: str) -> None:
    global builds
    with build_dir(lib) as tmp:
        src, out = tmp / "kernel.c", tmp / "kernel.so"
        src.write_text(source)
        r = subprocess.run([cc, *flags, f'-DKVT_KEY="{key}"', str(src), "-o", str(out)],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            first = next((ln for ln in r.stderr.splitlines() if "error" in ln), r.stderr.strip()[:200])
            raise RuntimeError(f"{cc} failed: {first}")
        install(out, lib, key, {"compiler": cc, "flags": flags})
    builds += 1


def load_library(name: str, source: str, flags: list[str], defs: dict) -> ctypes.CDLL:
    """The library of `source` built with `flags` and `defs`, compiled on first use and cached.
    `source` defines `const char kvt_key[] = KVT_KEY;` (the key is passed at compile time). A
    cached file is loaded only once its stamp vouches for it (`verify`); one that does not match
    its name is rebuilt, with one line, and never loaded; after loading, its compiled-in key is
    compared with its name's before anything in it is called. RuntimeError when it cannot be built."""
    global _swept
    lib, key, dflags, cc = library_path(name, source, flags, defs)
    if not _swept:
        remove_orphans(lib.parent)
        _swept = True
    if verify(lib, key) is not None:
        with locked(lib):                        # one builder per key; the others wait here
            why = verify(lib, key)               # built by the process we waited for?
            if why is not None:
                if why != "missing":
                    say_rebuilding(lib, why)
                _compile(lib, key, source, flags + dflags, cc)
                why = verify(lib, key)
                if why is not None:
                    raise RuntimeError(f"{lib} was replaced while it was built ({why})")
    dll = ctypes.CDLL(str(lib))
    try:
        stamped = (ctypes.c_char * (len(key) + 1)).in_dll(dll, "kvt_key").value.decode()
    except (ValueError, UnicodeDecodeError):
        stamped = None
    if stamped != key:            # vouched for by its stamp, yet built for another key: never call it
        raise RuntimeError(f"{lib} carries key {stamped!r}, not {key!r}; clear it: python -m runtime.cache "
                           "--clear kernels")
    return dll


# ----------------------------------------------------------------------------- runtime.cache

def entries(root: Path) -> list[Path]:
    """Every file under `root` (libraries, stamps, locks, build folders' contents)."""
    if not root.is_dir():
        return []
    return [p for p in root.rglob("*") if p.is_file()]


def clear(root: Path) -> list[Path]:
    """Delete everything in `root` but what a running build holds (a locked key's lock and its
    build folders). Returns the files removed."""
    gone: list[Path] = []
    if not root.is_dir():
        return gone
    busy = {p for p in root.glob("*.lock") if _is_locked(p)}
    for p in sorted(root.iterdir()):
        if p in busy:
            continue
        if p.is_dir():
            owner = _owner_lock(p, root)
            if owner is not None and owner in busy:
                continue
            gone += entries(p)
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone
