"""The chunk K/V store: each chunk's per-layer K/V from a prefill of the chunk alone at positions
0..n-1, held in memory and (store=disk) in safetensors files under the cache root. A file's name
and metadata carry a content hash of (model identity, K/V dtype, token ids) and a digest of the
tensors, so a stale, renamed or corrupt file is recomputed, never trusted; writes are atomic.

Beside the K/V, `features(ids)` holds each chunk's chunk-alone hidden-state norms, one float32 per
token and layer (what selector=draft_rel compares the in-context norms with): computed by a
trace of the chunk alone when first asked (the same pass fills the chunk's K/V when they are not
held yet: the trace is the chunk's prefill op for op), kept in memory and (disk) in `<key>.feat.safetensors`,
counted in stats["feature_bytes"] (core.policies.rag.feature_bytes) and their reads' seconds in
stats["feature_load_s"]."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from core.errors import ConfigError

from ..engine import prefill_once
from ..kv import resolve_kv_dtype
from ..model import Transformer

FORMAT = "kvtestbed-chunk-v1"
DEFAULT_MAX_BYTES = 4 * 2 ** 30     # policy.store_max_bytes: the store's files past this are evicted, least recently used first


def default_cache_dir() -> Path:
    from core.machine import cache_root

    return cache_root() / "chunks"


def model_identity(model: Transformer) -> str:
    """SHA-256 over the ModelArgs, the weights' dtype, and every weight tensor's name, shape,
    sum and sum of squares (float64): a changed weight changes the identity."""
    h = hashlib.sha256()
    h.update(json.dumps(asdict(model.args), sort_keys=True).encode())
    h.update(str(model.dtype).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            if name in ("rope_cos", "rope_sin"):
                continue
            t64 = t.detach().to(torch.float64)
            h.update(f"{name}:{tuple(t.shape)}:{float(t64.sum())!r}:{float(t64.square().sum())!r}".encode())
    return h.hexdigest()


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


ChunkKV = list[tuple[torch.Tensor, torch.Tensor]]   # per layer: k, v (1, H_kv, n, D)


class ChunkStore:
    """Per-chunk K/V (positions 0..n-1) in host memory and on disk; see the module docstring.

    A store is bound to the model's weights as they are when it is built (the identity is
    hashed once); build a new store after changing weights in place.
    """

    def __init__(self, model: Transformer, root: str | os.PathLike | None = None, kv_dtype: str = "auto",
                 disk: bool = True, max_bytes: int | None = DEFAULT_MAX_BYTES):
        if max_bytes is not None and max_bytes < 1:
            raise ConfigError(f"policy.store_max_bytes={max_bytes} must be >= 1 (bytes of chunk files kept on disk) "
                              "or null (no cap)")
        self.max_bytes = max_bytes
        self.model = model
        self.root = Path(root) if root is not None else default_cache_dir()
        self.kv_dtype = kv_dtype
        self.dtype = resolve_kv_dtype(kv_dtype, model.device)
        self.disk = disk
        self.model_id = model_identity(model)
        self.mem: dict[str, ChunkKV] = {}
        self.stats = {"mem_hits": 0, "disk_hits": 0, "computed": 0, "stale": 0, "corrupt": 0, "evicted": 0,
                      "feature_computed": 0, "feature_disk_hits": 0, "feature_bytes": 0, "feature_load_s": 0.0}
        self.feat: dict[str, torch.Tensor] = {}
        if disk and self.root.is_dir():      # a lowered cap (or a killed write's temp file) takes effect now
            self.stats["evicted"] = len([p for p in evict(self.root, max_bytes) if p.suffix == ".safetensors"])

    def key(self, ids: list[int]) -> str:
        h = hashlib.sha256()
        h.update(FORMAT.encode())
        h.update(self.model_id.encode())
        h.update(str(self.dtype).encode())
        h.update(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes())
        return h.hexdigest()

    def path(self, ids: list[int]) -> Path:
        return self.root / f"{self.key(ids)}.safetensors"

    def get(self, ids: list[int]) -> ChunkKV:
        ids = list(ids)
        if not ids:
            raise ConfigError("a chunk is empty; every chunk needs at least one token")
        if len(ids) > self.model.args.max_seq_len:
            raise ConfigError(f"a chunk has {len(ids)} tokens > the model's context of "
                              f"{self.model.args.max_seq_len}; lower policy.chunk_len")
        key = self.key(ids)
        if key in self.mem:
            self.stats["mem_hits"] += 1
            return self.mem[key]
        kv = self._read(key, len(ids)) if self.disk else None
        if kv is not None:
            self.stats["disk_hits"] += 1
        else:
            kv = self._compute(ids)
            self.stats["computed"] += 1
            if self.disk:
                self._write(key, kv, len(ids))
        self.mem[key] = kv
        return kv

    def features(self, ids: list[int]) -> torch.Tensor:
        """The chunk's chunk-alone hidden-state norms (L, n) float32 (see the module docstring)."""
        from core.policies.rag import feature_bytes

        ids = list(ids)
        key = self.key(ids)
        if key in self.feat:
            return self.feat[key]
        t0 = time.perf_counter()
        f = self._read_features(key, len(ids)) if self.disk else None
        if f is not None:
            self.stats["feature_disk_hits"] += 1
            self.stats["feature_load_s"] += time.perf_counter() - t0
        else:
            from .tracing import trace

            # the same pass is the chunk's prefill (op for op, kv_dtype auto): its K/V fill the store too
            share = self.kv_dtype == "auto" and key not in self.mem
            tr = trace(self.model, ids, self.model.args.n_layers, len(ids), keep_kv=share)
            f = tr.norms
            self.stats["feature_computed"] += 1
            if share:
                self.mem[key] = [(k.to(self.dtype), v.to(self.dtype)) for k, v in tr.kv]
                self.stats["computed"] += 1
                if self.disk:
                    self._write(key, self.mem[key], len(ids))
            if self.disk:
                self._write_tensors(key + ".feat", {"norms": f.detach().cpu().contiguous()}, len(ids))
        self.stats["feature_bytes"] += feature_bytes(len(ids), self.model.args.n_layers)
        self.feat[key] = f
        return f

    def _read_features(self, key: str, n: int) -> torch.Tensor | None:
        from safetensors import safe_open

        path = self.root / f"{key}.feat.safetensors"
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            if meta.get("format") != FORMAT or meta.get("key") != key + ".feat" or \
                    meta.get("sha256") != _tensor_digest(tensors):
                self.stats["corrupt"] += 1
                return None
            t = tensors["norms"]
            if tuple(t.shape) != (self.model.args.n_layers, n) or t.dtype != torch.float32:
                self.stats["corrupt"] += 1
                return None
        except Exception:   # truncated / garbage file: recompute, never trust
            self.stats["corrupt"] += 1
            return None
        return t.to(self.model.device)

    def _compute(self, ids: list[int]) -> ChunkKV:
        pre = prefill_once(self.model, [ids], kv_dtype=self.kv_dtype)
        return [(k.to(self.dtype), v.to(self.dtype)) for k, v in pre.kv]

    def _read(self, key: str, n: int) -> ChunkKV | None:
        from safetensors import safe_open

        path = self.root / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            os.utime(path)            # recency for the least-recently-used eviction
        except OSError:
            pass
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or meta.get("key") != key:
                    self.stats["stale"] += 1
                    return None
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            if meta.get("sha256") != _tensor_digest(tensors):
                self.stats["corrupt"] += 1
                return None
            L = self.model.args.n_layers
            kv = [(tensors[f"k.{i}"], tensors[f"v.{i}"]) for i in range(L)]
            want = (1, self.model.args.n_kv_heads, n, self.model.args.head_dim)
            if any(tuple(t.shape) != want or t.dtype != self.dtype for pair in kv for t in pair):
                self.stats["corrupt"] += 1
                return None
        except Exception:   # truncated / garbage file, missing tensor: recompute, never trust
            self.stats["corrupt"] += 1
            return None
        return [(k.to(self.model.device), v.to(self.model.device)) for k, v in kv]

    def _write(self, key: str, kv: ChunkKV, n: int) -> None:
        tensors = {}
        for i, (k, v) in enumerate(kv):
            tensors[f"k.{i}"] = k.detach().contiguous().cpu()
            tensors[f"v.{i}"] = v.detach().contiguous().cpu()
        self._write_tensors(key, tensors, n)

    def _write_tensors(self, key: str, tensors: dict[str, torch.Tensor], n: int) -> None:
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "key": key, "model_id": self.model_id, "n_tokens": str(n),
                "sha256": _tensor_digest(tensors)}
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.root)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, self.root / f"{key}.safetensors")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.stats["evicted"] += len([p for p in evict(self.root, self.max_bytes, keep=self.root / f"{key}.safetensors")
                                      if p.suffix == ".safetensors"])


def evict(root: str | os.PathLike, max_bytes: int | None, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used chunk files (oldest mtime: a read touches its file) until the
    store holds at most `max_bytes`; `keep` (the file just written) stays even if it alone is larger.
    Orphaned temp files of killed writes (over an hour old) go too. Returns the deleted files."""
    from core.results import clean_orphans

    root = Path(root)
    gone = clean_orphans(root)
    if max_bytes is None:
        return gone
    files = []
    for p in root.glob("*.safetensors"):
        try:
            st = p.stat()
        except OSError:
            continue                 # another process evicted it
        files.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in files)
    for _, size, p in sorted(files, key=lambda f: f[0]):
        if total <= max_bytes:
            break
        if keep is not None and p == keep:
            continue
        p.unlink(missing_ok=True)
        total -= size
        gone.append(p)
    return gone


def usage(root: str | os.PathLike) -> tuple[int, int]:
    """(files, bytes) of chunk files under `root`."""
    files = [p for p in Path(root).glob("*.safetensors") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)
