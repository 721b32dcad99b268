"""Sampling follows a plain reference distribution (temperature, top-k, top-p, greedy);
batched statistics give what one sequence at a time gives."""
from __future__ import annotations

import math

import pytest
import torch

from engine.api import SamplingParams
from engine.sampler import make_generator, sample_batch
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


def _reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [V] -> the distribution sampling must follow, float64, written out plainly:
    softmax of logits / temperature; top-k keeps the k highest; top-p then keeps the
    fewest most likely of those whose (renormalized) mass reaches top_p."""
    x = logits.double() / p.temperature
    order = sorted(range(x.numel()), key=lambda j: -float(x[j]))
    kept = order[:p.top_k] if p.top_k else order
    w = {j: math.exp(float(x[j]) - float(x[order[0]])) for j in kept}
    total = sum(w.values())
    nucleus, mass = [], 0.0
    for j in kept:                       # most likely first
        if mass >= p.top_p:
            break
        nucleus.append(j)
        mass += w[j] / total
    probs = torch.zeros(x.numel(), dtype=torch.float64)
    for j in nucleus:
        probs[j] = w[j]
    return probs / probs.sum()


def _reference_token(logits: torch.Tensor, p: SamplingParams) -> int:
    """Greedy: the argmax; else one draw from _reference_probs with a fresh generator
    seeded as the request's (the sampler's stream: torch.multinomial)."""
    if p.temperature == 0:
        return int(torch.argmax(logits))
    g = torch.Generator().manual_seed(p.seed)
    return int(torch.multinomial(_reference_probs(logits, p).float(), 1, generator=g))


@pytest.mark.parametrize("rows", [[0], [0, 3], [1], [1, 2, 4, 5], list(range(6))],
                         ids=str)
def test_sample_batch_equals_a_reference_drawn_with_the_same_generators(rows):
    gen = torch.Generator().manual_seed(len(rows))
    logits = torch.randn(len(rows), 97, generator=gen) * 3
    params = [PARAMS[r] for r in rows]
    got = sample_batch(logits, params, [make_generator(p, CPU) for p in params])
    assert got == [_reference_token(logits[i], p) for i, p in enumerate(params)]
    assert all(isinstance(t, int) for t in got)


def test_sample_batch_draws_follow_each_rows_generator():
    """Two steps in a row: each sampled row keeps drawing from its own generator."""
    p = SamplingParams(temperature=1.0, seed=7)
    logits = torch.zeros(3, 50)         # uniform: the draw is the generator's
    gens = [make_generator(p, CPU) for _ in range(3)]
    a = sample_batch(logits, [p] * 3, gens)
    b = sample_batch(logits, [p] * 3, gens)
    assert a[0] == a[1] == a[2] and b[0] == b[1] == b[2]   # same seed, same stream
    solo = torch.Generator().manual_seed(7)
    uniform = torch.full((50,), 1 / 50)
    assert [int(torch.multinomial(uniform, 1, generator=solo)) for _ in range(2)] \
        == [a[0], b[0]]
    assert sample_batch(logits[:0], [], []) == []


NUM_DRAWS = 10000


@pytest.mark.parametrize("p", [
    SamplingParams(temperature=0.5, seed=11),
    SamplingParams(temperature=1.5, top_k=4, seed=12),
    SamplingParams(temperature=1.0, top_p=0.6, seed=13),
    SamplingParams(temperature=0.8, top_k=6, top_p=0.7, seed=14),
], ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_sampled_tokens_follow_the_reference_distribution(p):
    """Many draws (fixed seed) of one row: no token outside top-k / the top-p nucleus,
    the nucleus holds at least top_p of the mass, and every token's frequency is within
    4.5 standard errors of the reference probability (temperature included)."""
    logits = torch.randn(24, generator=torch.Generator().manual_seed(p.seed)) * 1.5
    want = _reference_probs(logits, p)
    g = make_generator(p, CPU)
    got = sample_batch(logits.expand(NUM_DRAWS, -1), [p] * NUM_DRAWS, [g] * NUM_DRAWS)
    freq = torch.bincount(torch.tensor(got), minlength=24).double() / NUM_DRAWS
    support = set(torch.nonzero(want).flatten().tolist())
    assert set(got) <= support
    if p.top_k:
        assert len(support) <= p.top_k
    if p.top_p < 1:
        topk = _reference_probs(logits, SamplingParams(temperature=p.temperature,
                                                       top_k=p.top_k))
        assert float(topk[list(support)].sum()) >= p.top_p
    se = (want * (1 - want) / NUM_DRAWS).sqrt()
    assert ((freq - want).abs() <= 4.5 * se + 1e-12).all(), (freq, want)


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(5, 31, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1), SamplingParams(),
              SamplingParams(), SamplingParams(temperature=0.5, top_k=3, seed=2)]
    got = sample_batch(logits, params, [make_generator(p, CPU) for p in params])
    assert [got[i] for i in (0, 2, 3)] == logits[[0, 2, 3]].argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [1.4e-45, 1e-38, 1e-30])
def test_a_tiny_temperature_samples_the_argmax(temperature):
    """Found by tests/controller/test_fuzz.py: logits / 1e-38 overflowed to inf, softmax
    gave NaN and torch.multinomial raised, failing the engine step of every sequence in
    the batch. The limit of a temperature going to 0 is greedy."""
    logits = torch.randn(4, 31, generator=torch.Generator().manual_seed(5)) * 50
    params = [SamplingParams(temperature=temperature, seed=i) for i in range(4)]
    got = sample_batch(logits, params, [make_generator(p, CPU) for p in params])
    assert got == logits.argmax(-1).tolist()


def _reference_update(st: SeqStats, share: torch.Tensor) -> None:
    """The per-sequence update as first written (one sequence, scalar reads)."""
    n = share.numel()
    m = st.mass[:n] if st.mass.numel() >= n else \
        torch.cat([st.mass, torch.zeros(n - st.mass.numel())])
    st.mass = m * st.decay + (1 - st.decay) * share
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
