"""The GGUF tokenizer built with `tokenizers` against transformers' GGUF tokenizer."""
import pytest

TEXTS = [
    "Hello world 12345, it's 2026!",
    "<|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces\n\n\ttabs  ünïcödé 日本語 😀 and the end.",
    "def f(x):\n    return x**2 + 3.14159  # comment",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(shipped_tokenizer, hf_shipped, text):
    _, ref = hf_shipped
    ids = shipped_tokenizer.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert shipped_tokenizer.decode(ids, skip_special=False) == text


def test_digits_split_singly(shipped_tokenizer):
    # llama.cpp's `smollm` pre-tokenizer: every digit is its own pre-token
    ids = shipped_tokenizer.encode("1234567")
    assert len(ids) == 7
    assert shipped_tokenizer.decode(ids) == "1234567"


def test_chat_template_matches_transformers(shipped_tokenizer, hf_shipped):
    _, ref = hf_shipped
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert shipped_tokenizer.apply_chat_template(msgs) == ref.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)


def test_special_tokens(shipped_tokenizer):
    tok = shipped_tokenizer
    assert tok.eos_id == 2 and tok.token(2) == "<|im_end|>"
    assert tok.encode("<|im_end|>") == [2]
    assert tok.decode([2], skip_special=True) == ""
