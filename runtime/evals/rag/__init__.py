"""`python -m runtime.evals rag`: the quality of `policy=rag`'s selectors against full recompute
on seeded synthetic multi-document QA. data.py makes the samples, points.py the grid, run.py
runs it resumably, answers.py scores the outputs, report.py writes rag.csv and rag.png.
The task, its selectors and what is timed: docs/evals.md; the RAG method: docs/rag.md.
"""
from .answers import answer_settled, exact_match, extract_answer, normalize, token_f1
from .data import RagSample, make_rag, rag_samples
from .points import EPIC_FIXED, parse_shard, points
from .report import rag_figure, rag_table
from .run import TASK, Shared, decode_answer, run_rag, score_point, shared_work

__all__ = ["TASK", "EPIC_FIXED", "RagSample", "Shared", "answer_settled", "decode_answer", "exact_match",
           "extract_answer", "make_rag", "normalize", "parse_shard", "points", "rag_figure", "rag_samples",
           "rag_table", "run_rag", "score_point", "shared_work", "token_f1"]
