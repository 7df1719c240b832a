"""python -m runtime.cache: what kvtestbed keeps in the user's cache, and how to clear it.

    python -m runtime.cache                    # the cache root, and per part: files, bytes
    python -m runtime.cache --clear chunks     # empty the RAG chunk store (policy=rag policy.store=disk)
    python -m runtime.cache --clear profiles   # forget first-use profiles (re-measured at next use)
    python -m runtime.cache --clear kernels    # the compiled low-bit CPU kernels (rebuilt at next use)
    python -m runtime.cache --clear all

The root is core.machine.cache_root(): $KVTESTBED_CACHE, else $XDG_CACHE_HOME/kvtestbed, else
~/.cache/kvtestbed. The chunk store is capped by policy.store_max_bytes (least recently used files
evicted past it); the kernels folder loses only what killed builds left (runtime/kernel_cache.py);
nothing else is ever deleted except by --clear, which leaves alone a kernel being built now. Why
each part is kept: docs/profiles.md (first-use profiles, the kernels), docs/rag.md (the chunk store).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from core.errors import cli_errors

from . import kernel_cache

# a part's files: a glob in its folder (plus interrupted atomic writes), or a function of the folder
PARTS = {"chunks": "*.safetensors", "profiles": "*.json", kernel_cache.PART: kernel_cache.entries}


def _files(folder: Path, pattern) -> list[Path]:
    if callable(pattern):
        return pattern(folder)
    if not folder.is_dir():
        return []
    return [p for p in folder.glob(pattern) if p.is_file()] + [p for p in folder.glob(".*.tmp") if p.is_file()]


def _clear(folder: Path, pattern) -> list[Path]:
    if pattern is kernel_cache.entries:
        return kernel_cache.clear(folder)
    gone = _files(folder, pattern)
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="runtime.cache", description=__doc__.splitlines()[0])
    ap.add_argument("--clear", choices=[*PARTS, "all"], help="delete that part of the cache")
    a = ap.parse_args(argv)
    from core.machine import cache_root

    with cli_errors("runtime.cache"):
        root = cache_root()
        parts = list(PARTS) if a.clear == "all" else [a.clear] if a.clear else []
        for part in parts:
            gone = _clear(root / part, PARTS[part])
            print(f"cleared {root / part}: {len(gone)} files removed")
        print(f"cache root {root}")
        for part, pattern in PARTS.items():
            files = _files(root / part, pattern)
            print(f"  {part:<9} {len(files):>6} files  {sum(p.stat().st_size for p in files) / 2 ** 20:10.1f} MiB")


if __name__ == "__main__":
    main()
