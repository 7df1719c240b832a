"""The checks of `policy=rag` against the target model (the shape-free ones are the declaration's,
core/policies/rag.py), and how a benchmark prompt is cut into chunks and a question."""
from __future__ import annotations

from core.errors import ConfigError
from core.policies import knobs_of
from core.policies.rag import RagPolicyConfig

from ..model import Transformer


def check_policy(policy, model: Transformer, separate_draft: bool = False) -> RagPolicyConfig:
    """Raise ConfigError (one line naming the field) for a bad `policy=rag` config; returns its
    declaration. `policy`: the checked declaration (only the model checks run), or a config
    (built and checked here). separate_draft: a Draft is given, so draft_layers is checked
    against it, not the target."""
    if isinstance(policy, RagPolicyConfig):
        spec = policy
    else:
        spec = RagPolicyConfig(**{k: v for k, v in knobs_of(policy, RagPolicyConfig).items() if k != "name"})
        spec.check()
    spec.check_model(model.args.max_seq_len, model.args.n_layers, separate_draft=separate_draft)
    return spec


def split_chunks(ids: list[int], chunk_len: int) -> list[list[int]]:
    """A document's token ids cut into chunks of `chunk_len` (the last one may be shorter)."""
    if chunk_len <= 0:
        raise ConfigError(f"policy.chunk_len={chunk_len} must be >= 1")
    return [list(ids[i:i + chunk_len]) for i in range(0, len(ids), chunk_len)]


def split_prompt(prompt: list[int], chunk_len: int, question_len: int) -> tuple[list[list[int]], list[int]]:
    """A benchmark prompt as (chunks, question): the last `question_len` tokens are the question
    (all of them if the prompt is shorter), the rest chunks of `chunk_len`, the last one
    possibly shorter; the simulator twin cuts a prompt length the same way (RagPolicyConfig.split)."""
    q = min(question_len, len(prompt))
    n = len(prompt) - q
    return split_chunks(prompt[:n], chunk_len), list(prompt[n:])
