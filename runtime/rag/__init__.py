"""RAG chunk K/V reuse with selective recompute (`policy=rag`; the method: docs/rag.md).

store: the chunk K/V store (and chunk-alone features); placement: RoPE re-positioning; tracing: one
pass recording every signal (norms, K/V deviation, question attention); selectors: which tokens to
recompute (scores, sinks, recall vs oracle_dev); draft: a separate draft and token alignment;
prefill: selective recompute, `rag_prefill` and `oracle_set`.
"""
from core.policies.rag import SELECTORS, STORES, budget_of

from .checks import check_policy, split_chunks, split_prompt
from .draft import (Draft, align, encode_with_offsets, load_draft, separate_draft_select, text_and_offsets,
                    token_bytes)
from .placement import placed_kv, prefill_at, rerotate
from .prefill import RagResult, oracle_set, rag_prefill, select, selective_prefill
from .selectors import Trace, draft_scores, recall, selector_scores, span_complete, trace
from .store import FORMAT, ChunkKV, ChunkStore, default_cache_dir, model_identity

__all__ = ["FORMAT", "SELECTORS", "STORES", "ChunkKV", "ChunkStore", "Draft", "RagResult", "Trace", "align",
           "budget_of", "check_policy", "default_cache_dir", "draft_scores", "encode_with_offsets", "load_draft",
           "model_identity", "oracle_set", "placed_kv", "prefill_at", "rag_prefill", "recall", "rerotate", "select",
           "selective_prefill", "selector_scores", "separate_draft_select", "span_complete", "split_chunks",
           "split_prompt", "text_and_offsets", "token_bytes", "trace"]
