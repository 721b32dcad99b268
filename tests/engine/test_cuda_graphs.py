"""Decode steps replayed as CUDA graphs (skipped without CUDA): the same tokens and
logits as eager steps, also for a sequence moved (quantized, offloaded, evicted) between
two replays, and the steps graphs cannot take run eager and are counted."""
import pytest
import torch

from engine.actions import Evict, Offload, Quantize, SetDecodeMode
from engine.layout import FULL
from tests.engine.decoding import decode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def eng():
    from engine.engine import Engine, EngineConfig
    torch.backends.cuda.matmul.allow_tf32 = False
    e = Engine(EngineConfig(model="random:smollm2-135m", device="cuda", dtype="float32",
                            kv_budget_bytes=1 << 30, host_budget_bytes=1 << 30,
                            max_batch_tokens=1024, prefix_caching=False,
                            prefill_cut_tokens=0))   # prompts prefill in one step
    yield e
    e.stop()


def prompts(*lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 49152, (n,), generator=g).tolist() for n in lens]


def test_graph_steps_equal_eager_steps(eng):
    ps = prompts(300, 77, 513)
    before = eng.runner.graphs.stats.num_replays
    lg, toks = decode(eng, ps, 12)
    assert eng.runner.graphs.stats.num_replays - before >= 10
    ref_lg, ref_toks = decode(eng, ps, 12, graphs=False)
    assert toks == ref_toks
    for a, b in zip(lg, ref_lg):
        assert float((a - b).abs().max()) < 1e-4


def test_moves_between_replays_match_eager(eng):
    """Quantize, then offload, then evict the same sequence between decode steps: the
    steps around each move take graphs where they can (the mixed table replays a graph
    of its formats; the offloaded blocks' steps run eager) and equal an all-eager run of
    the same moves."""
    ps = prompts(400, 200, seed=1)

    def moves(step, sids):
        s = sids[0]
        return {2: [Quantize(s, (1, 2, 3), 4)], 4: [Offload(s, (5, 6))],
                6: [Evict(s, (8,))]}.get(step, [])
    stats = eng.runner.graphs.stats
    eager0, replays0 = stats.num_eager, stats.num_replays
    lg, toks = decode(eng, ps, 10, moves)
    assert stats.num_replays > replays0 and stats.num_eager > eager0
    assert "offloaded blocks stream through staging" in stats.eager_reasons
    assert any(len(k[2]) > 1 for k in eng.runner.graphs.graphs)    # a mixed-format graph
    ref_lg, ref_toks = decode(eng, ps, 10, moves, graphs=False)
    assert toks == ref_toks
    for a, b in zip(lg, ref_lg):
        assert float((a - b).abs().max()) < 1e-4
    assert eng.store.held_slots("gpu") == 0


def test_topk_offload_steps_replay_graphs(eng):
    """A sequence decoding over top-k pages of its offloaded blocks (the picks, the
    gather from pinned host memory and the table patch all run on the device) replays a
    graph, beside a sequence all on the GPU, once its set of top-k rows has held for a
    few steps (eager before: TOPK_CAPTURE_AFTER); the same tokens and logits as eager
    top-k steps with the same moves."""
    from engine.cuda_graphs import TOPK_CAPTURE_AFTER
    ps = prompts(700, 150, seed=5)

    def moves(step, sids):
        s = sids[0]
        n = len(eng.store.seqs[s].blocks) - 1
        return [SetDecodeMode(s, "topk", 4), Offload(s, tuple(range(n)))] if step == 1 else []
    stats = eng.runner.graphs.stats
    eager0, replays0 = stats.num_eager, stats.num_replays
    new = stats.eager_reasons.get("new top-k rows (captured once they hold for a few steps)", 0)
    lg, toks = decode(eng, ps, 12, moves)
    assert stats.num_eager - eager0 == TOPK_CAPTURE_AFTER - 1, stats.eager_reasons
    assert stats.eager_reasons["new top-k rows (captured once they hold for a few steps)"] \
        - new == TOPK_CAPTURE_AFTER - 1
    assert stats.num_replays - replays0 >= 11 - TOPK_CAPTURE_AFTER
    assert any(k[3] for k in eng.runner.graphs.graphs)      # a graph with a top-k row
    ref_lg, ref_toks = decode(eng, ps, 12, moves, graphs=False)
    assert toks == ref_toks
    for a, b in zip(lg, ref_lg):
        assert float((a - b).abs().max()) < 1e-4
    assert eng.store.held_slots("gpu") == 0


def test_uniformly_quantized_batch_replays_a_graph_of_its_format(eng):
    """A sequence whose every block is int8 (fill format from the start would leave the
    tail full; here the test quantizes all but the tail, then evicts nothing): a graph is
    captured for the (batch, width, int8) key once its table holds one format."""
    from engine.cuda_graphs import DecodeGraphs
    g = eng.runner.graphs
    assert isinstance(g, DecodeGraphs)
    keys = set(g.graphs)
    decode(eng, prompts(64, seed=2), 4)
    assert any(k[2] == (FULL,) for k in g.graphs) and set(g.graphs) >= keys


def test_compiled_graphs_equal_eager_steps(eng):
    """The decode step compiled around kvctl attention (engine.compile_decode) and
    captured: the same tokens and logits as eager steps, also with a sequence quantized
    and evicted between replays."""
    from engine import attention
    from engine.cuda_graphs import DecodeGraphs
    compiled = DecodeGraphs(eng.model, eng.store, eng.num_layers, eng.device,
                            eng.config.max_running, compiled=attention.compile_model(eng.model))
    ps = prompts(300, 77, 513, seed=4)

    def moves(step, sids):
        return {2: [Quantize(sids[0], (1, 2), 8)], 4: [Evict(sids[0], (5,))]}.get(step, [])
    saved, eng.runner.graphs = eng.runner.graphs, compiled
    try:
        lg, toks = decode(eng, ps, 10, moves)
    finally:
        eng.runner.graphs = saved
    assert compiled.stats.num_replays >= 4
    ref_lg, ref_toks = decode(eng, ps, 10, moves, graphs=False)
    assert toks == ref_toks
    for a, b in zip(lg, ref_lg):
        assert float((a - b).abs().max()) < 1e-4


def test_mixed_format_tables_replay_graphs(eng):
    """A batch whose tables hold four formats (int8, int4, k4v2 and the full newest
    blocks) replays one graph a step, no eager step, and equals eager steps."""
    ps = prompts(350, 260, seed=5)

    def moves(step, sids):
        return {0: [Quantize(sids[0], (1, 2), 8), Quantize(sids[0], (3, 4), 4),
                    Quantize(sids[1], (2, 3), 4, 2)]}.get(step, [])
    stats = eng.runner.graphs.stats
    eager0, replays0 = stats.num_eager, stats.num_replays
    lg, toks = decode(eng, ps, 8, moves)
    assert stats.num_eager == eager0 and stats.num_replays - replays0 >= 7
    assert any(len(k[2]) == 4 for k in eng.runner.graphs.graphs)
    ref_lg, ref_toks = decode(eng, ps, 8, moves, graphs=False)
    assert toks == ref_toks
    for a, b in zip(lg, ref_lg):
        assert float((a - b).abs().max()) < 1e-4


def test_five_formats_and_a_subset_of_a_captured_graph_replay_graphs(eng):
    """Five formats in one batch's tables (int8, int2, k4v2, int4 and the full newest)
    replay a graph, no eager step; a later batch of three of them (int8, int2, full)
    replays that graph (its other formats' runs empty) without a capture of its own;
    both equal eager steps."""
    int2 = 2

    def five(step, sids):
        return {0: [Quantize(sids[0], (1, 2), 8), Quantize(sids[0], (3, 4), 4),
                    Quantize(sids[1], (2, 3), 4, 2), Quantize(sids[1], (5, 6), int2)]
                }.get(step, [])

    def three(step, sids):
        return {0: [Quantize(sids[0], (1, 2), int2), Quantize(sids[1], (2, 3), 8)]
                }.get(step, [])
    graphs = eng.runner.graphs
    stats = graphs.stats
    for moves, seed in ((five, 11), (three, 12)):
        ps = prompts(340, 280, seed=seed)
        eager0, replays0, keys0 = stats.num_eager, stats.num_replays, set(graphs.graphs)
        lg, toks = decode(eng, ps, 8, moves)
        assert stats.num_eager == eager0 and stats.num_replays - replays0 >= 7
        new = set(graphs.graphs) - keys0
        if moves is five:
            assert any(len(k[2]) == 5 for k in graphs.graphs)
        else:
            assert not any(len(k[2]) == 3 for k in new)     # replayed the five-format one
        ref_lg, ref_toks = decode(eng, ps, 8, moves, graphs=False)
        assert toks == ref_toks
        for a, b in zip(lg, ref_lg):
            assert float((a - b).abs().max()) < 1e-4


def test_a_graph_that_cannot_be_captured_runs_eager(eng, monkeypatch):
    """A capture that raises (out of memory, an op that cannot be captured) fails no
    step: that key's steps run eager, counted with the reason, tokens as eager."""
    from engine.cuda_graphs import DecodeGraphs
    g = DecodeGraphs(eng.model, eng.store, eng.num_layers, eng.device, eng.config.max_running)

    def boom(*a, **k):
        raise RuntimeError("cannot capture")
    monkeypatch.setattr(g, "_capture", boom)
    saved, eng.runner.graphs = eng.runner.graphs, g
    ps = prompts(90, 40, seed=6)
    try:
        lg, toks = decode(eng, ps, 5)
    finally:
        eng.runner.graphs = saved
    assert g.stats.num_replays == 0 and g.stats.num_eager >= 5
    assert any("graph capture failed (RuntimeError)" in r for r in g.stats.eager_reasons)
    ref_lg, ref_toks = decode(eng, ps, 5, graphs=False)
    assert toks == ref_toks


def test_graphs_are_captured_at_start_up(eng):
    """engine.graph_capture_tokens (2048 by default): every batch bucket's full-precision
    graph for such contexts exists before the first request, with its time and pool
    memory counted; a batch of short prompts then replays without capturing."""
    g = eng.runner.graphs
    width = {k[1] for k in g.graphs if k[2] == (FULL,)}
    assert all(any(k[0] == B and k[2] == (FULL,) for k in g.graphs) for B in g.buckets)
    assert g.stats.capture_seconds > 0 and max(width) >= 64
    before = g.stats.num_graphs
    decode(eng, prompts(100, 300, 50, seed=7), 4)
    assert g.stats.num_graphs == before


def test_deferred_statistics_equal_immediate_ones(eng, monkeypatch):
    """On CUDA a step's block shares are folded into the statistics while the next
    step runs (OfflineMixin._after, defer): after the last step is flushed, every
    sequence's decayed mass equals the one updated step by step."""
    from engine import engine as engine_mod
    ps = prompts(200, 90, seed=3)
    masses = []
    for defer in (True, False):
        seen = {}
        orig = engine_mod.Engine._after

        def after(self, plan, defer=False, _on=defer, _o=orig):
            _o(self, plan, defer and _on)
            for sid in plan.decode.seq_ids if plan.decode is not None else ():
                seen[sid] = self.stats[sid]
        monkeypatch.setattr(engine_mod.Engine, "_after", after)
        decode(eng, ps, 9)
        eng._apply_deferred_stats()
        masses.append([s.mass.clone() for s in seen.values()])   # in submission order
        monkeypatch.undo()
    for a, b in zip(*masses):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_overlapped_steps_give_the_tokens_of_steps_in_order(eng):
    """Steps launched ahead (``overlap_steps``: the tokens sampled on the device feed the
    next replay before the host reads them) give the tokens and finishes of steps run
    one after the other: greedy and sampled rows, rows ending by length at different
    steps, and rows ending on a stop token while their next step was already launched."""
    from engine.api import Request, SamplingParams
    from tests.engine.test_overlap import run_all

    def reqs(ignore_eos=True):
        ps = prompts(300, 77, 513, 40, seed=7)
        out = []
        for i, (p, m) in enumerate(zip(ps, (9, 3, 14, 6))):
            sp = SamplingParams(max_tokens=m, ignore_eos=ignore_eos, temperature=0.7 * (i % 2),
                                seed=i)
            out.append(Request(prompt_ids=p, sampling=sp))
        return out
    eos = set(eng.eos_ids)
    try:
        eng.config.overlap_steps = "off"
        want = run_all(eng, reqs())
        stop = want[2][0][5]
        eng.eos_ids = {stop}
        want_stop = run_all(eng, reqs(ignore_eos=False))
        eng.config.overlap_steps = "auto"
        n0 = eng.num_overlapped
        eng.eos_ids = eos
        assert run_all(eng, reqs()) == want
        eng.eos_ids = {stop}
        assert run_all(eng, reqs(ignore_eos=False)) == want_stop
    finally:
        eng.config.overlap_steps, eng.eos_ids = "auto", eos
    assert want_stop[2][1] == "stop"
    assert eng.num_overlapped - n0 >= 10
    assert eng._ahead is None and eng.store.held_slots("gpu") == 0
