"""What one policy scores on one sample, starting from the sample's shared full-precision prefill.

Teacher forcing runs the policy's own decode path (`decode_step`, and for a speculative cache
the same guess-carrying steps the engine runs), feeding the true tokens instead of sampled ones:
the log-probs then measure what the policy's compressed / gathered attention does to the model,
on exactly the tokens we care about (the passkey's digits, the last tokens of a document).
"""
from __future__ import annotations

import re
import time

import torch

from ..engine import Prefilled, SamplingParams, decode_step, generate, load_prefilled, policy_stats_of, speculate
from ..kv import make_cache
from ..model import Transformer
from .data import PasskeySample, TextSample, TextTokenizer


def teacher_force(model: Transformer, policy, pre: Prefilled, targets: list[int]) -> tuple[list[float], dict]:
    """log p(targets[j] | prompt, targets[:j]) under `policy`, one decode step per target after
    the first (whose log-prob the prefill's logits give). Returns (log-probs, policy stats)."""
    args = model.args
    T = pre.kv[0][0].shape[2]
    cache = make_cache(policy, n_layers=args.n_layers, batch=1, n_kv_heads=args.n_kv_heads,
                       head_dim=args.head_dim, capacity=T + len(targets) + 1, device=model.device)
    logits = load_prefilled(cache, pre)
    lps = [_logprob(logits, targets[0])]
    guess, guesses, hits = None, 0, 0
    if cache.speculative and len(targets) > 1:
        guess = speculate(model, cache, _tok(targets[0], model), pre.pad).argmax(-1)
    for prev, nxt in zip(targets[:-1], targets[1:]):
        tok = _tok(prev, model)
        if guess is None:
            logits = decode_step(model, cache, tok, pre.pad)
        else:
            both = decode_step(model, cache, tok, pre.pad, guess=guess)
            logits = both[:, 0]
            guesses += 1
            hits += int(guess.item() == nxt)   # the guess was of this step's true token
            guess = both[:, 1].argmax(-1)
        lps.append(_logprob(logits, nxt))
    return lps, policy_stats_of(cache, guesses, hits)


def _tok(i: int, model: Transformer) -> torch.Tensor:
    return torch.tensor([i], dtype=torch.long, device=model.device)


def _logprob(logits: torch.Tensor, target: int) -> float:
    return float(torch.log_softmax(logits[0].double(), dim=-1)[target])


def passkey_answer(text: str) -> str:
    """The first run of digits in a continuation ('' if none)."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else ""


def score_passkey(model: Transformer, tok: TextTokenizer, policy, pre: Prefilled, s: PasskeySample,
                  max_new_tokens: int = 8) -> dict:
    """Greedy continuation (correct = its first run of digits is exactly the passkey) and the teacher-forced log-prob of the
    digits, both from the shared prefill."""
    t0 = time.perf_counter()
    res = generate(model, [s.prompt], SamplingParams(max_new_tokens=max_new_tokens), policy, prefilled=pre)
    t_gen = time.perf_counter() - t0
    out = tok.decode(res.requests[0].tokens)
    lps, tf_stats = teacher_force(model, policy, pre, tok.encode(s.passkey))
    return {"correct": passkey_answer(out) == s.passkey, "output": out, "digit_logprob": sum(lps), "digit_logprobs": lps,
            "policy_stats": res.policy_stats, "tf_policy_stats": tf_stats,
            "generate_s": t_gen, "seconds": time.perf_counter() - t0}


def score_ppl(model: Transformer, policy, pre: Prefilled, s: TextSample, last: int) -> dict:
    """Teacher-forced NLL of the sample's last `last` tokens after a prefill of the rest."""
    t0 = time.perf_counter()
    lps, stats = teacher_force(model, policy, pre, s.tokens[-last:])
    nll = -sum(lps)
    return {"nll_sum": nll, "n_tokens": len(lps), "nll_mean": nll / len(lps),
            "policy_stats": stats, "seconds": time.perf_counter() - t0}
