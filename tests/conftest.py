import os
import tempfile
import warnings

import pytest
import torch

from runtime.loaders import random_init
from runtime.model import ModelArgs

warnings.filterwarnings("ignore", message=".*pynvml.*")

# the tests never read or write the user's cache (profiles of this machine, chunk store)
os.environ["KVTESTBED_CACHE"] = tempfile.mkdtemp(prefix="kvtestbed-test-cache-")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache root of its own, and no committed profiles to fall back on."""
    from core.profile import lookup

    root = tmp_path / "cache"
    monkeypatch.setenv("KVTESTBED_CACHE", str(root))
    monkeypatch.setattr(lookup, "REPO_PROFILES", tmp_path / "repo_profiles")
    return root


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class Policy:
    """A policy config as the engine reads it (Hydra gives a DictConfig with the same fields)."""

    def __init__(self, name="full", kv_dtype="auto"):
        self.name, self.kv_dtype = name, kv_dtype


@pytest.fixture
def full_policy():
    return Policy()


TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=512, max_seq_len=512,
            rope_base=10000.0)


@pytest.fixture
def tiny_model():
    return random_init(ModelArgs(**TINY), seed=0)


@pytest.fixture(scope="session")
def shipped_model():
    from runtime.loaders import load_gguf

    return load_gguf()


@pytest.fixture(scope="session")
def shipped_tokenizer():
    from runtime.tokenizer import from_gguf

    return from_gguf(None)


@pytest.fixture(scope="session")
def hf_shipped():
    """transformers' own GGUF loading of the shipped file: the independent reference."""
    transformers = pytest.importorskip("transformers")
    from runtime.loaders import shipped_gguf_path

    p = shipped_gguf_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    return model.eval(), tok
