"""Quality of KV policies against `full`: passkey retrieval and teacher-forced perplexity.

    python -m runtime.evals passkey [--lengths 1024 2048 3072] [--depths 0.1 0.3 0.5 0.7 0.9] [--n 4]
                                    [--policies SPEC ...] [--model smollm2|tiny] [--format plain|chat]
                                    [--out results/evals/passkey]
    python -m runtime.evals ppl     [--context 2048] [--last 512] [--n 8] [--policies SPEC ...] [--out ...]
    python -m runtime.evals report  --out results/evals/passkey

Policy specs (`specs.py`): `full`, `offload`, `kivi<bits>[-g<N>][-r<N>]`,
`specache-k<k>-b<bits>[-g<N>][-r<N>][-noprefetch]`, e.g. `kivi2`, `specache-k64-b2`,
`specache-k16-b1-g32-noprefetch`; defaults group 64, residual 64, prefetch on. Presets: `default`
(37 policies: full, offload, KIVI 1/2/4-bit, SpeCache k in {0,16,64,256} x 1/2 bits x
group 32/64 x prefetch on/off) and `small`. `full` is always run: every statistic is paired with it.

Data (`data.py`), generated in code and seeded, nothing downloaded:
- passkey: the classic filler ("The grass is green. The sky is blue. ...") with the needle
  "The pass key is NNNNN. Remember it. NNNNN is the pass key." at a depth (fraction of the
  filler), then "What is the pass key? The pass key is ". Sample i is a pure function of
  (seed, length, depth, i, format); the prompt is within one filler sentence (~6 tokens) of the
  target length. Measured on the shipped SmolLM2 with `full` (seed 0, 4 samples per depth x 5
  depths at 1K, 2 per depth at 3K): plain completion 20/20 at 1K and 10/10 at 3K (mean digit
  log-prob -0.089 and -0.121 nats); the chat template with "The pass key is " put in the
  assistant's mouth (`--format chat`) 20/20 and 10/10 (-0.046 and -0.138). A tie on retrieval,
  so the default is plain: no dependence on a model's template, the literature's format.
- perplexity: CPython's own documentation text, `pydoc_data.topics.topics` (the long English
  help texts behind `help("with")` etc., shipped with every Python install), joined in a seeded
  order and cut into consecutive windows of `--context` tokens.

Method: each sample is prefilled once in full precision (`engine.prefill_once`) and every
policy decodes from that cache (exact: prefill is full-precision attention for every policy).
Per (sample, policy) the passkey task records the greedy continuation (max 8 tokens; correct =
its first run of digits is the passkey), the teacher-forced log-prob of the 5 digit tokens, and
the engine's policy stats (SpeCache guess accuracy, top-k recall); the ppl task teacher-forces
the last `--last` tokens through the policy's decode path, one `decode_step` per token
(`score.py`; a speculative cache runs the guess-carrying steps the engine runs).

Results: `<out>/<task>.jsonl`, one fsynced line per (sample, policy), so a rerun resumes (points
with an "error" line are retried: a policy that raised is recorded, not fatal), and
`<out>/<task>.run.json` (the grid and provenance). `report` (run after every task too) writes
`<out>/<task>.csv` and `<out>/<task>.png`: per (length, policy) accuracy, exact McNemar p vs
full, mean digit log-prob delta vs full with a seeded BCa bootstrap 95% interval; per (context,
policy) perplexity with its interval and the paired ratio to full's (`stats.py`).

Timing on the 2-core CPU box (shipped model, fp32, uncontended points): prefill 1.2 s at 1K,
3.8 s at 2K, once per sample; one passkey point (8 greedy tokens + 5 teacher-forced) 0.4 s for
full/offload, 0.55-0.75 s for kivi, 0.8-1.1 s for specache at 1K and 2K; perplexity ~35 ms per
scored token for full, ~43 for kivi2, ~68 for specache-k64-b2 at a 1K context.
"""
