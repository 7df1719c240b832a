"""The answer of a RAG eval output and its score: SQuAD's normalisation, exact match, token F1,
and when greedy decoding can stop because no further token changes the extracted answer.
"""
from __future__ import annotations

import re
import string
from collections import Counter


def normalize(s: str) -> str:
    """SQuAD's answer normalisation: lowercase, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def extract_answer(output: str) -> str:
    """The continuation up to the end of the answered slot: its first non-empty line, cut at the
    first '.', ',' or ' in ' (after "X was born in", " Kelmar in 1873." answers "Kelmar")."""
    for line in output.split("\n"):
        if line.strip():
            return re.split(r"[.,]| in ", line.strip() + " ", maxsplit=1)[0].strip()
    return ""


def exact_match(pred: str, gold: str) -> bool:
    return normalize(pred) == normalize(gold)


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def answer_settled(text: str) -> bool:
    """True once no continuation of `text` can change `extract_answer`: the first non-empty line
    is complete (a newline follows it) or already holds its cut ('.', ',' or ' in ' whole)."""
    lines = text.split("\n")
    if any(line.strip() for line in lines[:-1]):
        return True
    return bool(re.search(r"[.,]| in ", lines[-1].lstrip()))
