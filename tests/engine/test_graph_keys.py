"""Which captured CUDA graph a decode step replays (engine/cuda_graphs.py ``key``), on the
CPU: the choice is table bookkeeping, no device needed. The replays themselves are
compared with eager steps in test_cuda_graphs.py (CUDA)."""
import pytest

from engine.actions import Offload, SetDecodeMode
from engine.api import Request, SamplingParams
from engine.cuda_graphs import TOPK_CAPTURE_AFTER, DecodeGraphs
from engine.layout import FULL


def graphs_over(store):
    """A DecodeGraphs over ``store`` without a device: only its key choice is used."""
    g = object.__new__(DecodeGraphs)
    g.store, g.buckets, g.max_width, g.start_width = store, (1, 2, 4, 8), 1 << 12, 0
    g.graphs, g.failed, g._topk_seen = {}, {}, (None, 0)
    return g


def start(tiny, n):
    sid = tiny.submit(Request(prompt_ids=[(7 * i) % 300 + 1 for i in range(n)],
                              sampling=SamplingParams(max_tokens=100, ignore_eos=True)),
                      lambda ev: None)
    while tiny.seqs[sid].state != "decode":
        tiny.step()
    return sid


def test_a_narrower_table_replays_a_captured_wider_graph(tiny):
    """A step whose table is narrower than a graph already captured for its batch
    bucket (or a larger one: its extra rows are padding), formats and top-k rows
    replays that graph (no new capture): its own bucket first, then the narrowest;
    with none, or only one of another format or top-k rows or a smaller bucket, its
    own key."""
    short, long_ = start(tiny, 30), start(tiny, 200)     # 8 and 51 blocks of 4 tokens
    g = graphs_over(tiny.store)
    own = g.key([(short, 0)])
    assert own == (1, 16, (FULL,), ())
    wide = (1, 64, (FULL,), ())
    g.graphs[(1, 128, (FULL,), ("x",))] = g.graphs[(1, 128, (FULL, "int4"), ())] = object()
    assert g.key([(short, 0)]) == own                    # none of its kind
    g.graphs[(2, 128, (FULL,), ())] = object()
    assert g.key([(short, 0)]) == (2, 128, (FULL,), ())  # a larger bucket's, padded
    g.graphs[wide] = g.graphs[(1, 256, (FULL,), ())] = object()
    assert g.key([(short, 0)]) == wide                   # its own bucket's narrowest
    assert g.key([(long_, 0)]) == wide
    assert g.key([(short, 0), (long_, 0)]) == (2, 128, (FULL,), ())
    assert g.key([(short, 0), (long_, 0), (short, 0)]) == (4, 64, (FULL,), ())  # none larger
    g.graphs.clear()
    g.graphs[(256, 64, (FULL,), ())] = g.graphs[(64, 64, (FULL,), ())] = object()
    g.buckets = (1, 2, 4, 8, 64, 256)
    assert g.key([(short, 0)]) == (64, 64, (FULL,), ())       # padded up to 64 rows
    g.graphs.pop((64, 64, (FULL,), ()))
    assert g.key([(short, 0)]) == own                          # not 256 rows for one
    # a top-k row's offloaded blocks are in the key: not the full-precision graphs
    tiny.handle.apply(SetDecodeMode(short, "topk", 2))
    tiny.handle.apply(Offload(short, (1, 2, 3)))
    topk = (1, 16, (FULL,), ((0, 16, 2, tiny.store.geom.slot_bytes(FULL)),))
    assert g.key([(short, 0)]) != topk              # a new top-k set: eager a few steps
    g.graphs[topk] = object()
    assert g.key([(short, 0)]) == topk
    for s in (short, long_):
        tiny.cancel(s)
    tiny.step()


def test_step_times_are_moving_averages_per_kind():
    """What losing the graphs costs, as the controller reads it (EngineSnapshot.graphs):
    replayed and eager decode steps timed apart, each a moving average from its first."""
    from engine.cuda_graphs import GraphStats
    st = GraphStats()
    st.note_step(True, 0.010)
    assert (st.replay_step_s, st.eager_step_s) == (0.010, 0.0)
    st.note_step(False, 0.050)
    st.note_step(True, 0.020)
    assert st.eager_step_s == 0.050
    assert 0.010 < st.replay_step_s < 0.020


def test_a_mixed_table_replays_a_graph_of_more_formats(tiny):
    """A batch of three or more formats replays a captured graph whose formats include
    its own (fewest extra formats first, then the narrowest) instead of a capture per
    set of formats; two formats (one launch reads both runs) and full precision keep
    their own graphs; five formats in one table still get a graph (MAX_FORMATS)."""
    from engine.actions import Quantize
    from engine.layout import KVFormat
    int8, int4, k4v2, int2 = (KVFormat.parse(f) for f in ("int8", "int4", "k4v2", "int2"))
    def fm(*fs):                      # as keys hold them: by code
        return tuple(sorted((FULL,) + fs, key=lambda f: f.code))
    a, b = start(tiny, 120), start(tiny, 80)
    g = graphs_over(tiny.store)
    g.graphs[(2, 64, fm(int8, int4), ())] = g.graphs[(1, 64, fm(int4), ())] = object()
    tiny.handle.apply(Quantize(a, (1, 2), 4))
    assert g.key([(a, 0), (b, 0)]) == (2, 32, fm(int4), ())         # two: its own
    assert g.key([(b, 0)]) == (1, 32, (FULL,), ())                  # full: its own
    tiny.handle.apply(Quantize(b, (1, 2), 2))
    three = (2, 32, fm(int4, int2), ())
    assert g.key([(a, 0), (b, 0)]) == three                         # none includes it
    big = (2, 64, fm(int8, int4, int2), ())
    bigger = (2, 32, fm(int8, int4, k4v2, int2), ())
    g.graphs[big] = g.graphs[bigger] = object()
    assert g.key([(a, 0), (b, 0)]) == big                           # one extra, not two
    tiny.handle.apply(Quantize(a, (3, 4), 8))
    tiny.handle.apply(Quantize(a, (5, 6), 4, 2))
    five = g.key([(a, 0), (b, 0)])
    assert five == bigger and len(five[2]) == 5
    g.graphs.clear()
    assert g.key([(a, 0), (b, 0)]) == bigger                        # its own, not eager
    for s in (a, b):
        tiny.cancel(s)
    tiny.step()


def test_topk_graph_keys_hold_while_other_sequences_finish(tiny):
    """A CUDA graph is keyed by its top-k rows' places in the batch. With top-k rows
    first, a sequence before them finishing leaves the key as it was, and a new set of
    top-k rows waits a few steps (eager) before its capture: 21-22 s of ~90 went to
    captures on the headline's H100 run, when every finish moved the top-k rows and
    every top-k offload took a capture at once. The key is computed as the engine's
    graphs would (no GPU here)."""
    graphs = graphs_over(tiny.store)
    ids = [tiny.submit(Request(prompt_ids=[(5 * i + j) % 300 + 1 for j in range(40)],
                               sampling=SamplingParams(max_tokens=200, ignore_eos=True)),
                       lambda ev: None) for i in range(4)]
    while any(tiny.seqs[s].state != "decode" for s in ids):
        tiny.step()
    tiny.handle.apply(SetDecodeMode(ids[3], "topk", 2))
    tiny.handle.apply(Offload(ids[3], (1, 2, 3, 4)))
    decode, dec_seqs, _, _ = tiny._schedule()
    assert [s.seq_id for s in dec_seqs][0] == ids[3]          # the top-k row first
    assert sorted(sid for sid, _ in decode) == sorted(ids)    # nobody left out
    # a new set of top-k rows runs eager until it has held for a few steps, then
    # its graph is captured
    keys = [graphs.key(decode) for _ in range(TOPK_CAPTURE_AFTER)]
    assert all(isinstance(k, str) for k in keys[:-1])
    before = keys[-1]
    assert before[3] and before[3][0][0] == 0
    tiny.step()
    tiny.cancel(ids[0])
    tiny.step()
    decode, _, _, _ = tiny._schedule()
    assert len(decode) == 3 and graphs.key(decode)[3] == before[3]


def test_steps_with_topk_rows_are_timed_apart():
    """Decode-only steps with top-k rows (replayed or eager) are timed apart from the
    others, with their number of top-k rows: what a top-k row adds to a step, which the
    controller prices a top-k offload with. Replayed and eager steps keep their own."""
    from engine.cuda_graphs import GraphStats
    st = GraphStats()
    st.note_step(True, 0.020)
    st.note_step(False, 0.080)
    st.note_step(True, 0.060, topk_rows=4)
    st.note_step(False, 0.100, topk_rows=2)
    assert (st.replay_step_s, st.eager_step_s) == (0.020, 0.080)
    assert st.topk_step_s == pytest.approx(0.064) and st.topk_rows == pytest.approx(3.8)
