"""`rag`: chunk K/V reuse with selective recompute. The cache is a `full` one; what differs is
the prefill (runtime/rag/: reused chunk K/V re-rotated, the selected tokens recomputed), which
runtime.bench runs one request at a time through runtime/bench_rag.py (`rag_runs`)."""
from __future__ import annotations

from core.policies.rag import RagPolicyConfig

from .base import register
from .full import FullKV


@register
class RagKV(FullKV):
    declaration = RagPolicyConfig
    serves = False          # runtime.serve's continuous batching has no selective-recompute prefill
    bench = "runtime.bench_rag:rag_runs"    # one request at a time, each with its chunk-reuse prefill
