"""`rag`: chunk K/V reuse with selective recompute. The cache is a `full` one; what differs is
the prefill (runtime/rag/: reused chunk K/V re-rotated, the selected tokens recomputed), which
runtime.bench runs one request at a time through `bench` (runtime/bench_rag.py)."""
from __future__ import annotations

from .full import FullKV


class RagKV(FullKV):
    serves = False          # runtime.serve's continuous batching has no selective-recompute prefill

    @staticmethod
    def bench(model, cfg, prompts, params, link):
        """The timed runs of `python -m runtime.bench policy=rag` (one request: the first prompt)."""
        from ..bench_rag import bench_rag

        return bench_rag(model, cfg, prompts[0], params, link=link)
