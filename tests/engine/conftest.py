import pytest
import torch

from engine.engine import Engine, EngineConfig


@pytest.fixture(scope="session")
def engine():
    """The default model through kvctl's engine, fp32 on CPU (loaded once)."""
    e = Engine(EngineConfig(model="default", device="cpu", dtype="float32",
                            max_batch_tokens=512))
    yield e
    e.stop()


@pytest.fixture(scope="session")
def hf_model():
    """The same weights through plain transformers (sdpa, its own cache)."""
    from transformers import AutoModelForCausalLM

    from engine.models import default_model_dir
    m = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="session")
def long_ids(engine):
    """~1K tokens of real text (the stdlib's pydoc topics)."""
    import pydoc_data.topics as t
    text = " ".join(list(t.topics.values())[:40])
    return engine.tokenizer(text)["input_ids"]


@pytest.fixture
def tiny():
    """A 2-layer random Llama: fast engine tests of bookkeeping. Every step packed full
    (prefill_cut_tokens=0): tests prefill several prompts in one step."""
    e = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32",
                            block_size=4, kv_budget_bytes=2 << 20, page_bytes=4096,
                            max_batch_tokens=64, prefill_cut_tokens=0))
    yield e
    e.stop()
