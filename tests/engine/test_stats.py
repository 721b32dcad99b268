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
