"""Quantize actions mid-generation: bytes freed exactly, illegal actions change nothing."""
import pytest
import torch

from engine.actions import ActionError, Quantize, SetFillFormat
from engine.api import Request, SamplingParams
from engine.layout import FULL, KVFormat
from engine.store import GPU


def start(engine, n_prompt=70, max_tokens=200):
    sid = engine.submit(Request(prompt_ids=[(i * 7) % 500 + 1 for i in range(n_prompt)],
                                sampling=SamplingParams(max_tokens=max_tokens,
                                                        ignore_eos=True)),
                        lambda ev: None)
    engine.step()
    engine.step()
    return sid


def state(engine, sid):
    kv = engine.store.seqs[sid]
    a = engine.store.arenas[GPU]
    return ([(b.index, b.fmt, b.tier, b.offset, b.num_tokens) for b in kv.blocks],
            a.alloc.used_slot_bytes, a.alloc.num_slots, a.data.clone())


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "k4v2", "k8v4"])
def test_bytes_freed_match_format_arithmetic(tiny, fmt):
    sid = start(tiny)
    f = KVFormat.parse(fmt)
    kv = tiny.store.seqs[sid]
    blocks = tuple(range(len(kv.blocks) - 1))
    before_tier, _ = tiny.store.bytes_by(sid)
    res = tiny.handle.apply(Quantize(sid, blocks, f.k_bits, f.v_bits))
    g, L = tiny.geom, tiny.num_layers
    expect = (g.slot_bytes(FULL) - g.slot_bytes(f)) * L * len(blocks)
    assert res.freed_bytes[GPU] == expect
    after_tier, after_fmt = tiny.store.bytes_by(sid)
    assert before_tier[GPU] - after_tier[GPU] == expect
    assert after_fmt[f.name] == g.slot_bytes(f) * L * len(blocks)
    assert tiny.store.arenas[GPU].block_bytes == after_tier[GPU]
    tiny.cancel(sid)


def test_requantize_down_and_generation_goes_on(tiny):
    sid = start(tiny)
    seq = tiny.seqs[sid]
    for bits in (8, 4, 2):
        n = len(tiny.store.seqs[sid].blocks) - 1
        tiny.handle.apply(Quantize(sid, tuple(range(n)), bits))
        made = len(seq.output_ids)
        tiny.step()
        assert len(seq.output_ids) == made + 1
    fmts = {b.fmt.name for b in tiny.store.seqs[sid].blocks[:-2]}
    assert fmts == {"int2"}
    tiny.cancel(sid)
    assert tiny.store.held_slots(GPU) == 0


@pytest.mark.parametrize("action, msg", [
    (Quantize("nope", (0,), 4), "unknown sequence"),
    (Quantize("{sid}", (0,), 3), "bits"),
    (Quantize("{sid}", (0, 0), 4), "duplicate"),
    (Quantize("{sid}", (999,), 4), "out of range"),
    (Quantize("{sid}", (-1,), 4), "out of range"),
    (Quantize("{sid}", ("last",), 4), "newest"),
    (Quantize("{sid}", (), 4), "no blocks"),
])
def test_illegal_quantize_changes_nothing(tiny, action, msg):
    sid = start(tiny)
    last = len(tiny.store.seqs[sid].blocks) - 1
    blocks = tuple(last if b == "last" else b for b in action.blocks)
    act = Quantize(action.seq_id.format(sid=sid), blocks, action.bits)
    before = state(tiny, sid)
    with pytest.raises(ActionError, match=msg):
        tiny.handle.apply(act)
    after = state(tiny, sid)
    assert before[:3] == after[:3] and torch.equal(before[3], after[3])
    tiny.cancel(sid)


def test_raising_precision_is_refused(tiny):
    sid = start(tiny)
    tiny.handle.apply(Quantize(sid, (0,), 4))
    with pytest.raises(ActionError, match="cannot bring back"):
        tiny.handle.apply(Quantize(sid, (0,), 8))
    tiny.cancel(sid)


def test_fill_format_quantizes_blocks_as_they_fill(tiny):
    sid = start(tiny, n_prompt=6, max_tokens=40)
    tiny.handle.apply(SetFillFormat(sid, 4))
    for _ in range(20):
        tiny.step()
    kv = tiny.store.seqs[sid]
    assert kv.blocks[-1].fmt == FULL                     # the residual window
    assert all(b.fmt.name == "int4" for b in kv.blocks[:-1] if b.num_tokens == 4)
    assert sum(b.fmt.name == "int4" for b in kv.blocks) >= 4
    tiny.cancel(sid)


def test_int8_and_int4_keep_real_model_output_close(engine, long_ids, monkeypatch):
    """The default model's next-token distribution barely moves under int8 / int4."""
    monkeypatch.setattr(engine.config, "prefix_caching", False)   # each run prefills all
    ids = long_ids[:600]
    got = {}
    for fmt in (None, "int8", "int4"):
        logits = []
        engine.on_logits = lambda s, lg: logits.append(lg[0].clone())
        sid = engine.submit(Request(prompt_ids=ids, sampling=SamplingParams(max_tokens=2,
                                                                            ignore_eos=True)),
                            lambda ev: None)
        engine.step()                                     # prefill 512
        engine.step()                                     # rest of prefill + first token
        if fmt:
            n = len(engine.store.seqs[sid].blocks) - 1
            engine.handle.apply(Quantize(sid, tuple(range(n)), int(fmt[3:])))
        engine.step()                                     # decode over the quantized cache
        engine.on_logits = None
        got[fmt] = torch.log_softmax(logits[-1], -1)
    kl = lambda f: float((got[None].exp() * (got[None] - got[f])).sum())  # noqa: E731
    assert kl("int8") < 1e-3
    assert kl("int4") < 0.05
    assert kl("int8") < kl("int4")
