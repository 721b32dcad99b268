"""Every registered strategy, on real engine snapshots: the byte target is reached with
exactly the bytes the engine then reports, only the lowest-scored eligible blocks are
touched, and the engine accepts every proposed action."""
import random

import pytest
import torch

from controller.strategies import Context, ScoredStrategy, registry
from engine.actions import Evict
from engine.api import Request, SamplingParams
from tests.controller.helpers import tiny_engine

NAMES = sorted(registry())


@pytest.fixture
def eng():
    e = tiny_engine(staging_bytes=64 << 10)
    yield e
    e.stop()


def running_sequence(e, seed):
    rng = random.Random(seed)
    n = rng.randint(30, 60)
    sid = e.submit(Request(prompt_ids=[rng.randint(1, 500) for _ in range(n)],
                           sampling=SamplingParams(max_tokens=500, ignore_eos=True)),
                   lambda ev: None)
    for _ in range(rng.randint(2, 9)):
        e.step()
    return sid


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_strategy_reaches_target_with_exact_bytes(eng, name, seed):
    strat = registry()[name]
    sid = running_sequence(eng, seed)
    snap = eng.handle.snapshot()
    ctx = Context.from_snapshot(snap)
    seq = next(s for s in snap.sequences if s.seq_id == sid)
    most = strat.propose(seq, 10**15, ctx)
    assert most is not None, f"{name} found nothing to do on a {len(seq.blocks)}-block sequence"
    target = ctx.format_bytes["full"] * random.Random(seed).randint(1, 4)
    cand = strat.propose(seq, target, ctx)
    assert cand is not None and cand.seq_id == sid
    assert cand.kind == strat.kind or (cand.parts and cand.kind == "evict")
    assert cand.freed_bytes >= min(target, most.freed_bytes)
    if cand.parts:      # a plan of several moves: its parts add up to it
        assert sum(p.freed_bytes for p in cand.parts) == cand.freed_bytes
        assert sorted(i for p in cand.parts for i in p.blocks) == list(cand.blocks)
    if isinstance(strat, ScoredStrategy):
        eligible = strat.eligible(seq, ctx)
        assert cand.freed_bytes >= min(target, sum(strat.freed(b, ctx) for b in eligible))
        # minimal: without its highest-scored pick the target would not be met
        picked = [b for b in seq.blocks if b.index in cand.blocks]
        top = max(picked, key=lambda b: (strat.score(seq, b), b.index))
        assert cand.freed_bytes - strat.freed(top, ctx) < target
        # kept eligible blocks all score at least as high as every touched one
        kept = [b for b in eligible if b.index not in cand.blocks]
        if kept:
            assert min(strat.score(seq, b) for b in kept) >= max(strat.score(seq, b)
                                                                 for b in picked)
    # the engine accepts the moves and frees exactly what was predicted
    gpu_before = eng.store.bytes_by(sid)[0].get("gpu", 0)
    for a in cand.actions:
        eng.handle.apply(a)
    gpu_after = eng.store.bytes_by(sid)[0].get("gpu", 0)
    assert gpu_before - gpu_after == cand.freed_bytes
    eng.step()                                   # and generation goes on
    eng.cancel(sid)
    eng.store.clear_cache()
    for a in eng.store.arenas.values():
        assert a.alloc.num_slots == 0


@pytest.mark.parametrize("name", NAMES)
def test_no_strategy_quantizes_a_lossy_block_again(eng, name):
    """A block leaves full precision once, into its final format: new codes made from
    lossy codes would compound the error (issue 15)."""
    from engine.actions import Quantize

    strat = registry()[name]
    sid = running_sequence(eng, 7)
    seq = next(s for s in eng.handle.snapshot().sequences if s.seq_id == sid)
    half = tuple(b.index for b in seq.blocks[1:-1:2])
    eng.handle.apply(Quantize(sid, half, 8))
    snap = eng.handle.snapshot()
    seq = next(s for s in snap.sequences if s.seq_id == sid)
    cand = strat.propose(seq, 10**15, Context.from_snapshot(snap))
    for a in (cand.actions if cand else ()):
        if isinstance(a, Quantize):
            assert not set(a.blocks) & set(half), (name, a)
    eng.cancel(sid)


@pytest.mark.parametrize("name", NAMES)
def test_strategy_never_touches_newest_or_sink(eng, name):
    strat = registry()[name]
    sid = running_sequence(eng, 5)
    snap = eng.handle.snapshot()
    ctx = Context.from_snapshot(snap)
    seq = next(s for s in snap.sequences if s.seq_id == sid)
    cand = strat.propose(seq, 10**12, ctx)       # ask for everything
    newest = seq.blocks[-1].index
    assert newest not in cand.blocks
    for a in cand.actions:
        if isinstance(a, Evict):
            assert all(i >= ctx.num_sink_blocks for i in a.blocks)
    eng.cancel(sid)


def test_heavy_hitter_keeps_the_heaviest_blocks(eng):
    sid = running_sequence(eng, 3)
    snap = eng.handle.snapshot()
    seq = next(s for s in snap.sequences if s.seq_id == sid)
    ctx = Context.from_snapshot(snap)
    strat = registry()["heavy_hitter"]
    eligible = strat.eligible(seq, ctx)
    cand = strat.propose(seq, ctx.format_bytes["full"] * (len(eligible) // 2), ctx)
    masses = torch.tensor([b.mass for b in eligible])
    evicted = torch.tensor([b.index in cand.blocks for b in eligible])
    assert masses[~evicted].min() >= masses[evicted].max()
    eng.cancel(sid)


# -- mixed precision on synthetic views (no engine): which format each block gets
FULL = 1000
CTX = Context({"full": FULL, "int8": 312, "int4": 188, "k4v2": 156, "int2": 125,
               "k8v4": 250}, num_sink_blocks=1)


def synthetic(mass, fmt="full"):
    from engine.actions import BlockView, SequenceView

    n = len(mass)
    blocks = [BlockView(i, 32, fmt if 0 < i < n - 1 else "full", "gpu", FULL, m, m)
              for i, m in enumerate(mass)]
    return SequenceView("s", "held", 32 * n, 32 * n, 0, 0, "exact", 0, {"gpu": FULL * n},
                        {"full": FULL * n}, blocks, 1.0, mass[0], mass[-1])


def per_block(cand, seq):
    """Block index -> bytes the plan frees from it."""
    out = {}
    for p in cand.parts:
        for i in p.blocks:
            b = seq.blocks[i]
            out[i] = b.nbytes if p.kind == "evict" else b.nbytes - CTX.format_bytes[
                p.strategy.removeprefix("quantize_")]
    return out


def test_mixed_precision_gives_colder_blocks_fewer_bits():
    from controller.strategies import MixedPrecision

    rng = random.Random(0)
    for _ in range(300):
        mass = [rng.random() ** 3 for _ in range(16)]
        seq = synthetic(mass)
        target = rng.randint(1, 15 * FULL)
        cand = MixedPrecision().propose(seq, target, CTX)
        most = MixedPrecision().propose(seq, 10**9, CTX).freed_bytes
        assert cand.freed_bytes >= min(target, most)
        freed = per_block(cand, seq)
        # among blocks with the same options (not the sink, not the recent window): one
        # that carries more attention never gives up more of its bytes, but for the
        # plan's last change (the cheapest that finishes the target)
        mid = range(1, 14)
        hotter = {i for i in mid for j in mid
                  if mass[i] > mass[j] and freed.get(i, 0) > freed.get(j, 0)}
        assert len(hotter) <= 1, hotter


def test_mixed_precision_plans_as_the_greedy_over_every_ladder_built_up_front():
    """The plan builds a block's ladder only when the greedy reaches its class's next
    coldest block; the choices are those of the plain greedy (every block's ladder
    built, steps taken by cost per byte, the last one the cheapest that finishes),
    over mixed formats, skewed masses and both ladders."""
    import heapq

    from controller.strategies import MixedPrecision
    from controller.strategies.mixed_precision import _slope
    from engine.actions import BlockView, SequenceView

    def greedy(mp, seq, target):
        att = seq.blocks
        tm = sum(b.mass for b in att) or 1.0
        to = sum(b.observed for b in att) or 1.0
        share, newest = 1.0 / len(att), att[-1].index
        ladders, heap = {}, []
        for b in att[:-1]:                     # the newest block stays as it is
            ev = mp.evict and 1 <= b.index <= newest - mp.recent_blocks
            w = max(b.mass / tm, b.observed / to, b.distinct)
            lad = mp._ladder(mp._options(CTX, b.fmt, b.nbytes), b.nbytes, w, share, ev)
            if len(lad) > 1:
                ladders[b.index] = lad
                heapq.heappush(heap, (_slope(lad, 0), b.index, 0))
        chosen, freed = {}, 0
        while heap and freed < target:
            _, i, at = heap[0]
            lad = ladders[i]
            if lad[at + 1][0] - lad[at][0] >= target - freed:
                _, k, j = min((ladders[k][j][1] - ladders[k][a][1], k, j)
                              for _, k, a in heap for j in range(a + 1, len(ladders[k]))
                              if ladders[k][j][0] - ladders[k][a][0] >= target - freed)
                chosen[k] = ladders[k][j][2]
                break
            heapq.heappop(heap)
            freed += lad[at + 1][0] - lad[at][0]
            chosen[i] = lad[at + 1][2]
            if at + 2 < len(lad):
                heapq.heappush(heap, (_slope(lad, at + 1), i, at + 1))
        return chosen

    rng = random.Random(7)
    fb = CTX.format_bytes
    for _ in range(400):
        n = rng.randint(2, 40)
        blocks = []
        for i in range(n):
            f = rng.choice(["full"] * 5 + ["int8", "int4", "k4v2", "int2"]) \
                if 0 < i < n - 1 else "full"
            m = rng.random() ** rng.choice([1, 3, 8])
            blocks.append(BlockView(i, 32, f, "gpu", fb[f], m, rng.random() * m, 0,
                                    rng.random() * 0.1 if rng.random() < 0.3 else 0.0))
        seq = SequenceView("s", "held", 32 * n, 32 * n, 0, 0, "exact", 0,
                           {"gpu": sum(b.nbytes for b in blocks)}, {}, blocks, 1.0, 0, 0)
        target = rng.randint(1, sum(b.nbytes for b in blocks))
        for mp in (MixedPrecision(), MixedPrecision(formats=("int8", "int4"),
                                                    variant="int4")):
            assert mp.plan(seq, target, CTX) == greedy(mp, seq, target)


def test_mixed_precision_evicts_only_past_the_lowest_format():
    """Uniform attention: every block goes down the formats together, and only a
    target that int2 everywhere cannot meet brings evictions (the fewest that do)."""
    from controller.strategies import MixedPrecision

    seq = synthetic([1.0] * 16)
    all_int2 = 15 * (FULL - 125)
    for target in (all_int2 // 3, all_int2 // 2, all_int2):
        cand = MixedPrecision().propose(seq, target, CTX)
        assert cand.kind == "quantize" and cand.freed_bytes >= target
    over = all_int2 + 3 * 125
    cand = MixedPrecision().propose(seq, over, CTX)
    evicted = [i for p in cand.parts if p.kind == "evict" for i in p.blocks]
    assert cand.kind == "evict" and len(evicted) == 3 and cand.freed_bytes >= over
    assert all(0 < i < 14 for i in evicted)            # not the sink, not the recent window


def test_mixed_precision_never_requantizes_and_may_evict_lossy_blocks():
    from controller.strategies import MixedPrecision
    from engine.actions import Evict, Quantize

    seq = synthetic([1.0] * 16, fmt="int4")            # blocks 1..14 already int4
    cand = MixedPrecision().propose(seq, 10**9, CTX)
    for a in cand.actions:
        if isinstance(a, Quantize):
            assert set(a.blocks) <= {0}                # the full-precision sink only
    assert any(isinstance(a, Evict) for a in cand.actions)


def test_mixed_precision_keeps_4bit_keys_everywhere_before_any_block_goes_int2():
    """Compress, then ask: a later question may look at a block nothing has looked at
    yet, and 2-bit keys lose it (docs/BENCHMARKS.md, headline suite). So while the
    blocks can still give bytes by going to k4v2 (4-bit keys), none goes to int2 or is
    evicted, even a cold one beside blocks the prompt looked at hard (before KEY2_SHARE
    the cold ones went int2 first); past that, only cold blocks go lower."""
    from controller.strategies import MixedPrecision

    mass = [0.3] + [0.001] * 10 + [0.2, 0.3, 0.4, 0.5, 0.6]   # window hot, middle cold
    seq = synthetic(mass)
    all_k4v2 = 15 * (FULL - 156)
    for target in (all_k4v2 // 3, all_k4v2 // 2, all_k4v2 - 100):
        cand = MixedPrecision().propose(seq, target, CTX)
        fmts = {p.strategy.removeprefix("quantize_") for p in cand.parts}
        assert cand.freed_bytes >= target and cand.kind == "quantize"
        assert fmts <= {"int8", "int4", "k4v2"}, fmts
    for target in (all_k4v2 + 62, all_k4v2 + 500, 15 * (FULL - 125)):
        cand = MixedPrecision().propose(seq, target, CTX)
        lower = [i for p in cand.parts if p.strategy not in (
            "quantize_int8", "quantize_int4", "quantize_k4v2") for i in p.blocks]
        assert cand.freed_bytes >= target and lower
        assert all(mass[i] == 0.001 for i in lower), lower


def test_mixed_precision_int4_keeps_4bit_values_and_evicts_only_the_coldest_past_int4():
    """The registry's second ladder (mixed_precision_int4): no block goes below int4;
    once every block is int4, the coldest blocks are evicted, never a hot one, the sink
    or the recent window. At 25% of fp16 on the default model it beat the full ladder's
    k4v2-heavy plan on text (KL 0.0062 vs 0.0089) with the same needles
    (docs/BENCHMARKS.md, "Two ladders")."""
    from controller.strategies import MixedPrecision, registry

    strat = registry()["mixed_precision_int4"]
    assert isinstance(strat, MixedPrecision) and strat.name == "mixed_precision_int4"
    mass = [0.3] + [0.001] * 6 + [0.2] + [0.001] * 3 + [0.2, 0.3, 0.4, 0.5, 0.6]
    seq = synthetic(mass)
    all_int4 = 15 * (FULL - 188)
    for target in (all_int4 // 2, all_int4 - 50):
        cand = strat.propose(seq, target, CTX)
        assert cand.kind == "quantize" and cand.freed_bytes >= target
        assert {p.strategy for p in cand.parts} <= {"quantize_int8", "quantize_int4"}
    cand = strat.propose(seq, all_int4 + 3 * 188, CTX)
    evicted = [i for p in cand.parts if p.kind == "evict" for i in p.blocks]
    assert cand.freed_bytes >= all_int4 + 3 * 188 and len(evicted) == 3
    assert all(mass[i] == 0.001 for i in evicted), evicted
    assert {p.strategy for p in cand.parts} <= {"quantize_int8", "quantize_int4",
                                                "heavy_hitter"}


def test_a_fixed_format_pin_is_the_format_a_request_is_written_in():
    """Over the whole registry: a strategy of one fixed format names a format the engine
    writes (engine.moves.fill_format takes it); every other strategy, a profile name or
    none leaves the request at full precision. The daemon's wire request carries it."""
    from controller import convert
    from controller.strategies import ColdQuantization, fill_format_of
    from engine.actions import parse_fill_format as fill_format
    from kvctl_proto.kvctl.v1 import kvctl_pb2 as pb
    for name, strat in registry().items():
        got = fill_format_of(name)
        if isinstance(strat, ColdQuantization):
            assert fill_format(got) == strat.fmt and got != "full"
        else:
            assert got is None, name
    assert fill_format_of(None) is None and fill_format_of("balanced") is None
    req = convert.request_from_proto(pb.GenerateRequest(
        prompt_ids=pb.TokenIds(ids=[1, 2, 3]), strategy="quantize_int4"))
    assert req.kv_format == "int4"
    req = convert.request_from_proto(pb.GenerateRequest(
        prompt_ids=pb.TokenIds(ids=[1, 2, 3]), strategy="offload_exact"))
    assert req.kv_format is None
    req = convert.request_from_proto(pb.GenerateRequest(      # asked for on the wire
        prompt_ids=pb.TokenIds(ids=[1, 2, 3]), strategy="quantize_int4", kv_format="int8"))
    assert req.kv_format == "int8"
    with pytest.raises(ValueError, match="kv_format 'int3'"):
        convert.request_from_proto(pb.GenerateRequest(
            prompt_ids=pb.TokenIds(ids=[1, 2, 3]), kv_format="int3"))


def test_exact_offload_leaves_the_staging_the_other_sequences_stream():
    """One step's staging buffer streams every exact-mode sequence's offloaded blocks:
    a proposal takes only what the others leave of it (past it they would take turns,
    each decoding every other step)."""
    from dataclasses import replace

    from controller.strategies import registry
    seq = synthetic([1.0] * 16)
    off = registry()["offload_exact"]
    ctx = replace(CTX, staging_bytes=10 * FULL, num_layers=1, host_free_bytes=10**9)
    alone = off.propose(seq, 10**9, ctx)
    beside = off.propose(seq, 10**9, replace(ctx, streaming={"other": 7 * FULL}))
    full_again = off.propose(seq, 10**9, replace(ctx, streaming={"s": 7 * FULL}))
    assert len(alone.blocks) == 10 and len(beside.blocks) == 3
    assert len(full_again.blocks) == 10          # its own streaming is not "another's"
    assert off.propose(seq, 10**9, replace(ctx, streaming={"other": 10 * FULL})) is None


def test_the_context_counts_what_decoding_sequences_stream():
    """Exact mode streams every offloaded block, top-k mode k of them (at the largest
    one's size); sequences not decoding stream nothing."""
    from engine.actions import BlockView, SequenceView

    from controller.strategies.base import Context

    def view(sid, mode, state, host, k=0):
        blocks = [BlockView(i, 32, "full", "host" if i < host else "gpu", 64, 0.0, 0.0)
                  for i in range(4)]
        return SequenceView(sid, state, 128, 128, 0, 0, mode, k,
                            {"host": 64 * host, "gpu": 64 * (4 - host)}, {}, blocks, 1.0, 0, 0)

    class Snap:
        format_bytes, num_sink_blocks, staging_bytes, num_layers = {"full": 64}, 1, 640, 2
        tiers = {}
        sequences = [view("a", "exact", "decode", 2), view("b", "topk", "decode", 3, k=1),
                     view("c", "exact", "idle", 3), view("d", "exact", "stalled", 1),
                     view("e", "topk", "held", 3, k=2)]
    ctx = Context.from_snapshot(Snap)
    # per layer: 2 x 64 / 2; 1 of 3 x 64 / 2; 64 / 2
    assert ctx.streaming == {"a": 64, "b": 32, "d": 32}
    assert ctx.staging_left("a") == 640 - 64 and ctx.staging_left("x") == 640 - 128


def test_topk_offload_leaves_the_staging_the_other_sequences_stream():
    """A top-k sequence streams k of its offloaded blocks at every step: a proposal
    offloads only as many as keep its k inside what the others leave of the staging
    buffer. On the 2-core box, top-k offloads that ignored it left sequences skipping
    3 steps in 4 (0.6 s between two tokens)."""
    from dataclasses import replace

    from controller.strategies import registry
    seq = synthetic([1.0] * 16)
    topk = registry()["offload_topk"]
    ctx = replace(CTX, staging_bytes=4 * FULL, num_layers=1, host_free_bytes=10**9)
    alone = topk.propose(seq, 10**9, replace(ctx, staging_bytes=0))
    beside = topk.propose(seq, 10**9, replace(ctx, streaming={"other": 3 * FULL}))
    k = lambda c: next(a.top_k for a in c.actions if a.__class__.__name__ == "SetDecodeMode")  # noqa: E731
    assert k(beside) == 1 < k(alone)
    assert len(beside.blocks) < len(alone.blocks)
    assert topk.propose(seq, 10**9, replace(ctx, streaming={"other": 4 * FULL})) is None
