"""Decode steps through torch.compile (``engine.compile_decode``): kvctl attention is one
opaque custom op inside the compiled model, so the same steps give the same tokens and
logits as the eager model, across batch sizes (one dynamic graph, plus batch 1) and
with a block quantized between two steps (the op reads the plan, not the graph)."""
import pytest
import torch

from engine.actions import Evict, Quantize
from tests.engine.decoding import decode


@pytest.fixture(scope="module")
def eng():
    from engine.engine import Engine, EngineConfig
    e = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32",
                            compile_decode=True, host_budget_bytes=1 << 26))
    yield e
    e.stop()


def test_compiled_steps_equal_eager(eng):
    g = torch.Generator().manual_seed(3)
    calls = []
    real = eng.runner.compiled
    eng.runner.compiled = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        for lens in ((130, 33, 70), (45,), (200, 9)):
            ps = [torch.randint(0, 512, (n,), generator=g).tolist() for n in lens]

            def moves(step, sids):   # the first prompt holds 4+ blocks when it is long
                s = sids[0]
                return {1: [Quantize(s, (0,), 4)], 3: [Evict(s, (1,))]}.get(step, []) \
                    if len(ps[0]) > 100 else []
            lg, toks = decode(eng, ps, 6, moves)
            ref, ref_toks = decode(eng, ps, 6, moves, compiled=False)
            assert toks == ref_toks
            for a, b in zip(lg, ref):
                assert float((a - b).abs().max()) < 1e-4
    finally:
        eng.runner.compiled = real
    assert len(calls) >= 15          # the decode steps went through the compiled model


def test_compiled_op_outside_a_step_says_so():
    import engine.attention  # noqa: F401  (registers kvctl::attention)
    q = torch.zeros(1, 2, 3, 8)
    with pytest.raises(RuntimeError, match="outside attention.forward"):
        torch.ops.kvctl.attention(q, q, q, 0, 1.0)


def test_a_failing_compiled_step_falls_back_to_the_plain_model():
    """torch.compile failing on some shape mid-run must not end a request: the step runs
    again on the plain model, and every later one too (logged once)."""
    from engine.api import Request, SamplingParams
    from engine.engine import Engine, EngineConfig
    e = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32",
                            compile_decode=True))
    ref = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32"))
    try:
        calls = []

        def broken(*a, **k):
            calls.append(1)
            raise RuntimeError("inductor: unsupported shape")
        e.runner.compiled = broken
        req = dict(prompt_ids=list(range(1, 60)),
                   sampling=SamplingParams(max_tokens=8, ignore_eos=True))
        got = [ev for ev in e.generate(Request(**req))]
        want = [ev for ev in ref.generate(Request(**req))]
        assert got[-1].reason == "length" and got[-1].token_ids == want[-1].token_ids
        assert calls == [1] and e.runner.compiled is None
        assert e.num_step_failures == 0
    finally:
        e.stop()
        ref.stop()
