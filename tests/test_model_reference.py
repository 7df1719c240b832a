"""runtime/model.py on the shipped SmolLM2 GGUF against transformers' own GGUF loader (fp32)."""
import torch

from runtime.engine import SamplingParams, generate, prefill
from runtime.kv import make_cache

from .conftest import Policy

TEXT = ("The history of the Roman Empire spans more than a thousand years, from the founding of the city "
        "to the fall of Constantinople. Historians divide it into the Kingdom, the Republic and the Empire, "
        "each with its own institutions, wars and famous leaders such as Julius Caesar and Augustus.")


def _prompt(tok, n):
    ids = tok.encode(TEXT * 3)[:n]
    assert len(ids) == n
    return ids


def test_logits_match_transformers(shipped_model, shipped_tokenizer, hf_shipped):
    hf, _ = hf_shipped
    ids = _prompt(shipped_tokenizer, 64)
    x = torch.tensor([ids])
    args = shipped_model.args
    cache = make_cache(Policy(), n_layers=args.n_layers, batch=1, n_kv_heads=args.n_kv_heads,
                       head_dim=args.head_dim, capacity=64, device=torch.device("cpu"))
    from runtime.kv import Step

    step = Step(start=0, n_new=64, pad=torch.zeros(1, dtype=torch.long), positions=torch.arange(64)[None])
    ours = shipped_model(x, cache, step)                       # (1, 64, V)
    with torch.no_grad():
        ref = hf(x).logits.float()
    err = (ours - ref).abs().max().item()
    assert err <= 1e-3, f"max abs logit error {err}"
    # and the cached last-position path used by the engine agrees with the full pass
    cache2 = make_cache(Policy(), n_layers=args.n_layers, batch=1, n_kv_heads=args.n_kv_heads,
                        head_dim=args.head_dim, capacity=64, device=torch.device("cpu"))
    last = prefill(shipped_model, cache2, x, torch.zeros(1, dtype=torch.long))
    assert (last - ref[:, -1]).abs().max().item() <= 1e-3


def test_greedy_continuation_matches_transformers(shipped_model, shipped_tokenizer, hf_shipped):
    hf, _ = hf_shipped
    ids = _prompt(shipped_tokenizer, 64)
    ours = generate(shipped_model, [ids], SamplingParams(max_new_tokens=32, ignore_eos=True), Policy())
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, 64, dtype=torch.long),
                          max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=2)
    assert ours.requests[0].tokens == ref[0, 64:].tolist()


def test_config_matches_gguf_metadata(shipped_model, hf_shipped):
    hf, _ = hf_shipped
    a, c = shipped_model.args, hf.config
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_dim, a.vocab_size) == (
        c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
        c.intermediate_size, c.vocab_size) == (576, 30, 9, 3, 1536, 49152)
    assert a.rope_base == 100000.0 and a.max_seq_len == 8192 and a.tie_embeddings
    assert shipped_model.output.weight.data_ptr() == shipped_model.tok_embeddings.weight.data_ptr()


def test_sensible_chat_answer(shipped_model, shipped_tokenizer):
    tok = shipped_tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    r = generate(shipped_model, [ids], SamplingParams(max_new_tokens=24), Policy())
    text = tok.decode(r.requests[0].tokens)
    assert "Paris" in text, text
    assert r.requests[0].finished_by_eos


def test_padded_batch_greedy_matches_transformers_per_row(shipped_model, shipped_tokenizer, hf_shipped):
    """A left-padded batch of different lengths (masks, pad-aware positions, GQA folding of the
    mask) decodes, row by row, the tokens transformers' generate gives each prompt alone."""
    hf, _ = hf_shipped
    prompts = [_prompt(shipped_tokenizer, n) for n in (64, 41, 17)]
    ours = generate(shipped_model, prompts, SamplingParams(max_new_tokens=24, ignore_eos=True), Policy())
    for ids, got in zip(prompts, ours.requests):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=2)
        assert got.tokens == ref[0, len(ids):].tolist()
