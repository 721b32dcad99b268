"""Attention statistics from the decode kernel's partials equal eager attention's."""
import torch

from engine.api import Request, SamplingParams


def block_shares_eager(hf_model, ids, T):
    """Mean over layers and heads of the last query's attention summed per block."""
    hf_model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = hf_model(input_ids=torch.tensor([ids]), output_attentions=True)
    finally:
        hf_model.set_attn_implementation("sdpa")
    n = len(ids)
    nb = -(-n // T)
    shares = []
    for a in out.attentions:                      # [1, Hq, n, n]
        p = a[0, :, -1, :]                        # [Hq, n]
        p = torch.nn.functional.pad(p, (0, nb * T - n)).view(p.shape[0], nb, T).sum(-1)
        shares.append(p.mean(0))
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
    hf_model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = hf_model(input_ids=torch.tensor([ids]), output_attentions=True)
    finally:
        hf_model.set_attn_implementation("sdpa")
    n = len(ids)
    nb = -(-n // T)
    res = []
    for last in (window, accumulate):
        per_key = sum(a[0, :, -last:, :].sum((0, 1)) for a in out.attentions)   # [n]
        per_block = torch.nn.functional.pad(per_key, (0, nb * T - n)).view(nb, T).sum(-1)
        res.append(per_block / per_block.sum())
    return res


def test_prompt_scores_match_eager_attention_in_any_head_grouping(engine, hf_model, long_ids,
                                                                    monkeypatch):
    """SnapKV / H2O prompt scores equal eager attention's, whether the heads are scored
    all at once (short prompts) or in groups (long ones: OBSERVE_ELEMS)."""
    import engine.plan as plan_mod
    from engine.plan import ACCUMULATE
    prompt = long_ids[:300]          # one prefill chunk (max_batch_tokens 512)
    want_win, want_acc = _prompt_scores_eager(hf_model, prompt, engine.geom.block_size,
                                              engine.config.observe_window, ACCUMULATE)
    got = []
    # heads per group: all; 2 (scores, softmax: 2 x 256 x 300, k in fp32: 300 x 64 each); 1
    for elems in (plan_mod.OBSERVE_ELEMS, 2 * 300 * (2 * 256 + 64), 1):
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
