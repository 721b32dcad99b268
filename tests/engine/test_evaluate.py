"""The accuracy harness (benchmarks/evaluate.py): chunked teacher-forced NLL through the
engine equals a plain transformers forward; quantized formats really are used and
freed; passkey prompts have the asked length and depth; a passkey hit is the key in
the generated text."""
import dataclasses

import pytest
import torch

from benchmarks import evaluate as ev
from engine.engine import Engine, EngineConfig
from engine.layout import KVFormat
from engine.models import load_model
from engine.store import GPU

N_TOK = 50
CHUNK = 10  # not a multiple of the block size (4): chunks end mid-block


@pytest.fixture(scope="module")
def eng():
    e = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32",
                            block_size=4, kv_budget_bytes=2 << 20, page_bytes=4096))
    yield e
    e.stop()


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(7)
    return torch.randint(1, 512, (N_TOK,), generator=g).tolist()


@pytest.fixture(scope="module")
def full(eng, ids):
    return ev.teacher_forced_nll(eng, ids, "full", CHUNK)


def _empty(eng):
    return not eng.store.seqs and eng.store.held_slots(GPU) == 0


def test_full_nll_equals_plain_transformers_forward(eng, ids, full):
    hf = load_model("random:tiny", "cpu", "float32", seed=eng.config.seed).model
    for (n1, p1), (n2, p2) in zip(hf.named_parameters(), eng.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)          # same weights, independent model
    assert hf.config._attn_implementation != "kvctl"
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    ref = -torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:]).view(-1, 1))[:, 0]
    assert full.nll.shape == ref.shape == (N_TOK - 1,)
    torch.testing.assert_close(full.nll, ref, atol=2e-5, rtol=1e-5)
    assert full.scored.numel() == N_TOK - 1 - CHUNK
    assert full.kv_bytes_by_format == {"full": full.num_blocks * eng.store.block_bytes(
        KVFormat.parse("full"))}
    assert _empty(eng)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "k4v2", "fp8", "kfp8v4"])
def test_quantized_nll_is_really_quantized_and_freed(eng, ids, full, fmt):
    r = ev.teacher_forced_nll(eng, ids, fmt, CHUNK)
    f = KVFormat.parse(fmt)
    # all blocks but the newest were re-stored; the store's bytes say so exactly
    assert r.num_blocks == -(-N_TOK // 4) and r.quantized_blocks == r.num_blocks - 1
    assert r.kv_bytes_by_format == {
        f.name: (r.num_blocks - 1) * eng.store.block_bytes(f),
        "full": eng.store.block_bytes(KVFormat.parse("full"))}
    assert _empty(eng)
    # the first chunk's rows never see quantized KV: bit-identical to full precision
    assert torch.equal(r.nll[:CHUNK], full.nll[:CHUNK])
    diff = (r.nll[CHUNK:] - full.nll[CHUNK:]).abs()
    assert diff.max() > 0                                  # quantized KV was attended
    if fmt == "int8":
        assert diff.max() < 5e-3
        assert abs(r.ppl / full.ppl - 1) < 1e-3


def test_int2_moves_nll_more_than_int8(eng, ids, full):
    d = {f: float((ev.teacher_forced_nll(eng, ids, f, CHUNK).nll - full.nll).abs().mean())
         for f in ("int8", "int2")}
    assert 0 < d["int8"] < d["int2"]


def test_passkey_trial_decodes_over_quantized_cache(eng):
    prompt = ev.PasskeyPrompt(list(range(1, 31)), "77777", 0.5, 10, "")
    t = ev.passkey_trial(eng, prompt, "int4", max_new=6)
    # prefill is one step here (30 < max_batch_tokens): the quantize happens after it
    assert t.blocks_at_decode == 8 and t.quantized_at_decode == 7
    assert t.kv_bytes_by_format.get("int4", 0) > 0
    assert _empty(eng)      # hits need a tokenizer: the default model's test below


def test_passkey_trial_hit_is_the_key_in_the_generated_text(engine):
    """The default model repeats a passkey from 512 tokens over int4 KV (a hit); the same
    generation cut before the key is written, or judged for another key, is a miss."""
    before = set(engine.store.seqs)      # the engine is shared with other test files
    p = ev.build_passkey_prompt(engine.tokenizer, 512, 0.5, "40213")
    t = ev.passkey_trial(engine, p, "int4", max_new=8)
    assert t.output.startswith(" 40213") and t.hit
    n = -(-(len(p.ids) + 1) // engine.store.block_size)   # prompt + first token
    assert t.blocks_at_decode == n > 1 and t.quantized_at_decode == n - 1
    cut = ev.passkey_trial(engine, p, "int4", max_new=3)   # stops inside the key
    assert t.output.startswith(cut.output) and "40213" in p.text and not cut.hit
    other = ev.passkey_trial(engine, dataclasses.replace(p, key="40214"), "int4", max_new=8)
    assert other.output == t.output and not other.hit
    assert set(engine.store.seqs) == before


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from engine.models import default_model_dir
    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.mark.parametrize("total", [1024, 2048])
def test_passkey_prompt_length_and_depth(tokenizer, total):
    prev = -1.0
    for i in range(6):
        depth = i / 5
        p = ev.build_passkey_prompt(tokenizer, total, depth, "40213")
        assert abs(len(p.ids) - total) <= 4
        assert p.text.count("The pass key is 40213.") == 1
        assert p.text.endswith("The pass key is")
        # where the needle really sits, found from the text, in tokens
        at = len(tokenizer(p.text[:p.text.index(" The pass key is 40213")])["input_ids"])
        assert abs(at - p.needle_token) <= 1
        # within a filler sentence of the asked depth, except where clipped at the ends
        lo = len(tokenizer(ev.INTRO)["input_ids"]) / len(p.ids)
        hi = 1 - len(tokenizer(" " + ev.NEEDLE.format(key="40213") + " " + ev.QUESTION)
                     ["input_ids"]) / len(p.ids)
        want = min(max(depth, lo), hi)
        assert abs(at / len(p.ids) - want) <= 8 / total
        assert at / len(p.ids) > prev
        prev = at / len(p.ids)


def test_passkey_keys_fixed_and_five_digits():
    a = ev.passkey_keys([1024, 2048], [0.0, 0.5, 1.0], seed=3)
    assert a == ev.passkey_keys([1024, 2048], [0.0, 0.5, 1.0], seed=3)
    assert len(a) == 6 and all(len(k) == 5 and k.isdigit() for k in a.values())
    assert len(set(a.values())) > 1


def test_ppl_windows_same_for_every_call():
    text = list(range(1000))
    w = ev.ppl_windows(text, 100, 3)
    assert [o for o, _ in w] == [0, 450, 900] and all(len(x) == 100 for _, x in w)
    with pytest.raises(ValueError):
        ev.ppl_windows(text, 2000, 1)
