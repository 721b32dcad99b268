"""Batched sampling and statistics give what one row at a time gives."""
from __future__ import annotations

import math

import pytest
import torch

from engine.api import SamplingParams
from engine.sampler import _draw, make_generator, sample_batch
from engine.stats import SeqStats, update_batch

CPU = torch.device("cpu")
PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=0.8, seed=1),
    SamplingParams(temperature=1.0, top_k=5, seed=2),
    SamplingParams(),
    SamplingParams(temperature=0.7, top_p=0.9, seed=3),
    SamplingParams(temperature=1.3, top_k=40, top_p=0.5, seed=4),
]


@pytest.mark.parametrize("rows", [[0], [0, 3], [1], [1, 2, 4, 5], list(range(6))],
                         ids=str)
def test_sample_batch_equals_rows_one_at_a_time(rows):
    gen = torch.Generator().manual_seed(len(rows))
    logits = torch.randn(len(rows), 97, generator=gen) * 3
    params = [PARAMS[r] for r in rows]
    got = sample_batch(logits, params, [make_generator(p, CPU) for p in params])
    want = []
    for i, p in enumerate(params):   # fresh generators with the same seeds
        if p.temperature == 0:
            want.append(int(torch.argmax(logits[i])))
        else:
            want.append(int(_draw(logits[i], p, make_generator(p, CPU))))
    assert got == want
    assert all(isinstance(t, int) for t in got)


def test_sample_batch_draws_follow_each_rows_generator():
    """Two steps in a row: each sampled row keeps drawing from its own generator."""
    p = SamplingParams(temperature=1.0, seed=7)
    logits = torch.zeros(3, 50)         # uniform: the draw is the generator's
    gens = [make_generator(p, CPU) for _ in range(3)]
    a = sample_batch(logits, [p] * 3, gens)
    b = sample_batch(logits, [p] * 3, gens)
    assert a[0] == a[1] == a[2] and b[0] == b[1] == b[2]   # same seed, same stream
    solo = make_generator(p, CPU)
    assert [int(_draw(logits[0], p, solo)) for _ in range(2)] == [a[0], b[0]]
    assert sample_batch(logits[:0], [], []) == []


def _reference_update(st: SeqStats, share: torch.Tensor) -> None:
    """The per-sequence update as first written (one sequence, scalar reads)."""
    n = share.numel()
    st.mass = st._fit(st.mass, n) * st.decay + (1 - st.decay) * share
    st.last_share = share
    p = share[share > 0]
    ent = float(-(p * p.log()).sum()) if p.numel() else 0.0
    a = st.decay if st.steps else 0.0
    st.entropy = a * st.entropy + (1 - a) * ent
    st.sink_mass = a * st.sink_mass + (1 - a) * float(share[0]) if n else 0.0
    st.recent_mass = a * st.recent_mass + (1 - a) * float(share[-st.recent_blocks:].sum())
    st.steps += 1


@pytest.mark.parametrize("seed", range(4))
def test_update_batch_equals_sequence_by_sequence(seed):
    gen = torch.Generator().manual_seed(seed)
    ns = [1, 5, 0, 9, 3, 12]            # blocks per sequence; 12 is past the table width
    width = 9
    batch = [SeqStats(recent_blocks=r) for r in (2, 2, 1, 3, 2, 4)]
    ref = [SeqStats(recent_blocks=s.recent_blocks) for s in batch]
    for _ in range(3):
        share = torch.rand(len(ns), width, generator=gen)
        share[share < 0.3] = 0.0        # holes: blocks nobody attended
        for i, n in enumerate(ns):
            share[i, min(n, width):] = 0.0
        share = share / share.sum(1, keepdim=True).clamp_min(1e-30)
        update_batch(batch, share, ns)
        for st, i, n in zip(ref, range(len(ns)), ns):
            _reference_update(st, share[i, :n])
    for a, b in zip(batch, ref):
        assert a.steps == b.steps == 3
        torch.testing.assert_close(a.mass, b.mass)
        torch.testing.assert_close(a.last_share, b.last_share)
        for f in ("entropy", "sink_mass", "recent_mass"):
            assert math.isclose(getattr(a, f), getattr(b, f), rel_tol=1e-5, abs_tol=1e-7), f


def test_update_batch_with_no_blocks_attended():
    stats = [SeqStats(), SeqStats()]
    update_batch(stats, torch.zeros(2, 0), [0, 3])
    for st in stats:
        assert st.steps == 1 and st.mass.numel() == 0
        assert st.entropy == st.sink_mass == st.recent_mass == 0.0


def test_update_batch_without_a_recent_window():
    """recent_blocks 0: no recent-window mass (not the whole row)."""
    st = SeqStats(recent_blocks=0)
    update_batch([st], torch.tensor([[0.5, 0.25, 0.25]]), [3])
    assert st.recent_mass == 0.0 and math.isclose(st.sink_mass, 0.5)
