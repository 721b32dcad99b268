"""Attention statistics from the decode kernel's partials equal eager attention's."""
import pytest
import torch

from engine.api import Request, SamplingParams


def _eager_attentions(hf_model, ids):
    """Each layer's attention probabilities [1, Hq, n, n] from transformers' eager path."""
    hf_model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            return hf_model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    finally:
        hf_model.set_attn_implementation("sdpa")


def _per_block(x, T):
    """[..., n] per key -> [..., ceil(n / T)] per block of T keys."""
    n = x.shape[-1]
    nb = -(-n // T)
    return torch.nn.functional.pad(x, (0, nb * T - n)).view(*x.shape[:-1], nb, T).sum(-1)


def block_shares_eager(hf_model, ids, T):
    """Mean over layers and heads of the last query's attention summed per block."""
    shares = [_per_block(a[0, :, -1, :], T).mean(0) for a in _eager_attentions(hf_model, ids)]
    return torch.stack(shares).mean(0)


def test_block_shares_match_eager_attention(engine, hf_model, long_ids):
    prompt = long_ids[:300]
    sid = engine.submit(Request(prompt_ids=prompt,
                                sampling=SamplingParams(max_tokens=100, ignore_eos=True)),
                        lambda ev: None)
    try:
        for _ in range(6):      # prefill (1 step) + 5 decode steps
            engine.step()
        seq, stats, kv = engine.seqs[sid], engine.stats[sid], engine.store.seqs[sid]
        fed = prompt + seq.output_ids[:-1]   # what the cache holds, last = newest query
        assert kv.num_tokens == len(fed)
        want = block_shares_eager(hf_model, fed, engine.geom.block_size)
        got = stats.last_share
        assert got.shape == want.shape
        assert float((got - want).abs().max()) < 1e-4
        assert abs(float(got.sum()) - 1) < 1e-5
        # derived statistics are consistent with the shares they came from
        assert stats.steps == 5
        assert 0 < stats.sink_mass < 1 and 0 < stats.recent_mass < 1
        assert torch.all(stats.mass >= 0)
        # SnapKV observation scores over the prompt's blocks sum to one
        assert abs(float(stats.observed.sum()) - 1) < 1e-5
        assert stats.observed.numel() == -(-len(prompt) // engine.geom.block_size)
    finally:
        engine.cancel(sid)


def _prompt_scores_eager(hf_model, ids, T, window, accumulate):
    """SnapKV window scores and H2O accumulated scores per block, from eager attention:
    the last ``window`` (resp. ``accumulate``) queries' attention summed over layers and
    heads, normalized to sum to one."""
    attentions = _eager_attentions(hf_model, ids)
    res = []
    for last in (window, accumulate):
        per_key = sum(a[0, :, -last:, :].sum((0, 1)) for a in attentions)      # [n]
        per_block = _per_block(per_key, T)
        res.append(per_block / per_block.sum())
    return res


def test_prompt_scores_match_eager_attention_in_any_head_grouping(engine, hf_model, long_ids,
                                                                    monkeypatch):
    """SnapKV / H2O prompt scores equal eager attention's, whether the heads are scored
    all at once (short prompts) or in groups (long ones: OBSERVE_ELEMS)."""
    import engine.plan as plan_mod
    from engine.plan import ACCUMULATE
    # every run prefills the whole prompt (H2O scores are over the prompt's queries)
    monkeypatch.setattr(engine.config, "prefix_caching", False)
    prompt = long_ids[:300]          # one prefill chunk (max_batch_tokens 512)
    want_win, want_acc = _prompt_scores_eager(hf_model, prompt, engine.geom.block_size,
                                              engine.config.observe_window, ACCUMULATE)
    got = []
    assert engine.model.config.num_key_value_heads == 3
    # kv heads per group: all 3; 2 (scores, softmax: 3 query heads x 256 x 300 each, k in
    # fp32: 300 x 64); 1
    for elems in (plan_mod.OBSERVE_ELEMS, 2 * 300 * (2 * 3 * 256 + 64), 1):
        monkeypatch.setattr(plan_mod, "OBSERVE_ELEMS", elems)
        sid = engine.submit(Request(prompt_ids=prompt,
                                    sampling=SamplingParams(max_tokens=5, ignore_eos=True)),
                            lambda ev: None)
        try:
            engine.step()                # the prefill: observation, no decode step yet
            st = engine.stats[sid]
            assert st.steps == 0
            got.append((st.observed.clone(), st.mass.clone()))
        finally:
            engine.cancel(sid)
    for win, acc in got:
        assert float((win - want_win).abs().max()) < 1e-5
        assert float((acc - want_acc).abs().max()) < 1e-5


def test_prompt_statistics_seed_the_decode_statistics():
    """Right after a prefill, entropy, sink and recent-window mass come from the
    observation window (SnapKV's last queries), and the first decode step blends into
    them instead of replacing zeros."""
    import math

    from engine.stats import SeqStats
    st = SeqStats(decay=0.9, recent_blocks=2)
    window = torch.tensor([4.0, 1.0, 1.0, 2.0])
    st.observe(window, torch.tensor([1.0, 1.0, 1.0, 1.0]))
    p = [0.5, 0.125, 0.125, 0.25]
    assert st.entropy == pytest.approx(-sum(x * math.log(x) for x in p))
    assert st.sink_mass == pytest.approx(0.5) and st.recent_mass == pytest.approx(0.375)
    st.update(torch.tensor([0.25, 0.25, 0.25, 0.25]))
    assert st.sink_mass == pytest.approx(0.9 * 0.5 + 0.1 * 0.25)


def test_key_distinctness_points_at_the_needle_no_query_looked_at(engine):
    """A pass key in repeated filler, the question not asked yet: the prompt's last
    queries look at the filler, but the needle's keys stand out from the mean key, so
    its blocks lead the KeyDiff shares (the sink left out) while the filler's are ~0."""
    filler = ("The grass is green. The sky is blue. The sun is yellow. "
              "Here we go. There and back again. ")
    needle = "The pass key is 71432. Remember it. 71432 is the pass key. "
    head = engine.tokenizer(filler * 14)["input_ids"]
    ids = head + engine.tokenizer(needle + filler * 18)["input_ids"]
    engine.prefill("kd", ids)
    try:
        v = next(s for s in engine.handle.snapshot().sequences if s.seq_id == "kd")
        dist = [b.distinct for b in v.blocks]
        first = len(head) // 32                       # the needle starts in this block
        needle_blocks = {first, first + 1}
        top = sorted(range(1, len(dist)), key=lambda i: -dist[i])[:4]
        assert needle_blocks & set(top), (top, first)
        assert sum(dist) == pytest.approx(1.0, abs=1e-4) and dist[0] == 0.0
        filler_blocks = [dist[i] for i in range(1, len(dist)) if i not in needle_blocks]
        assert sorted(filler_blocks)[len(filler_blocks) // 2] < 0.01   # the median: ~0
        later_filler = dist[first + 4:-2]
        assert max(dist[i] for i in needle_blocks) > 3 * max(later_filler), dist
    finally:
        engine.release("kd")


def test_eviction_rebases_the_entropy_onto_the_blocks_left():
    """The smoothed entropy spread over blocks that an eviction removed read as a
    normalized entropy above 1 for the blocks left (outside every trained range of the
    learned predictor: it fell back). After an eviction it is at most the entropy of the
    decayed mass over the blocks still attended."""
    import math

    from engine.actions import Evict
    from engine.api import Request, SamplingParams
    from engine.engine import Engine, EngineConfig
    e = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32", block_size=4,
                            kv_budget_bytes=2 << 20, page_bytes=4096, max_batch_tokens=64))
    try:
        sid = e.submit(Request(prompt_ids=[(5 + 7 * j) % 400 + 1 for j in range(60)],
                               sampling=SamplingParams(max_tokens=40, ignore_eos=True)),
                       lambda ev: None)
        for _ in range(12):
            e.step()
        st = e.stats[sid]
        n = len(e.store.seqs[sid].blocks)
        assert st.entropy > math.log(3)              # spread over many blocks
        e.handle.apply(Evict(sid, tuple(range(1, n - 2))))
        left = [b for b in e.store.seqs[sid].blocks if b.tier == "gpu"]
        assert len(left) == 3
        assert st.entropy <= math.log(len(left)) + 1e-6
        for _ in range(3):                           # decoding goes on from there
            e.step()
        assert st.entropy <= math.log(len(e.store.seqs[sid].blocks) - n + 3 + 1) + 1e-6
    finally:
        e.stop()
