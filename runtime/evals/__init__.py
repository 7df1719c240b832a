"""Quality of KV policies against `full`: passkey retrieval, teacher-forced perplexity, RAG QA.

    python -m runtime.evals passkey [--lengths 1024 2048 3072] [--depths 0.1 0.3 0.5 0.7 0.9] [--n 4]
    python -m runtime.evals ppl     [--context 2048] [--last 512] [--n 8] [--policies SPEC ...]
    python -m runtime.evals rag     [--n 8] [--selectors full reuse random epic cacheblend draft] [--r ...]
    python -m runtime.evals report  --out results/evals/passkey

Policies by short names (`specs.py`: `kivi2`, `specache-k64-b2`, presets `default` / `small`);
data generated in code and seeded (`data.py`, `rag/data.py`); each sample prefilled once and
decoded by every policy; one fsynced JSON line per (sample, policy), so a rerun resumes
(`run.py`); `report.py` writes the paired statistics against `full` (`stats.py`). Method, data
and timings: docs/evals.md; the RAG eval's selectors: docs/rag.md.
"""
