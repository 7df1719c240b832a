"""`rag`: chunk K/V reuse with selective recompute. The cache is a `full` one; what differs is
the prefill (runtime/rag/: reused chunk K/V re-rotated, the selected tokens recomputed), which
runtime.bench runs one request at a time: runtime/bench_rag.py enters it here as `bench`."""
from __future__ import annotations

from .full import FullKV


class RagKV(FullKV):
    serves = False          # runtime.serve's continuous batching has no selective-recompute prefill
