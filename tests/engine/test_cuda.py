"""The engine on a GPU (skipped without CUDA): parity, offload, quantized decode."""
import pytest
import torch

from engine.actions import Offload, Quantize, SetDecodeMode
from engine.api import Request, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def gpu_engine():
    from engine.engine import Engine, EngineConfig
    torch.backends.cuda.matmul.allow_tf32 = False
    e = Engine(EngineConfig(model="random:smollm2-135m", device="cuda", dtype="float32",
                            kv_budget_bytes=1 << 30, host_budget_bytes=1 << 30,
                            max_batch_tokens=512, prefix_caching=False,
                            prefill_cut_tokens=0))   # prompts prefill in one step
    yield e
    e.stop()


def run(e, ids, actions=lambda s: [], steps=6):
    logits = []
    e.on_logits = lambda s, lg: logits.append(lg[0].float().cpu())
    sid = e.submit(Request(prompt_ids=ids, sampling=SamplingParams(max_tokens=steps + 2,
                                                                   ignore_eos=True)),
                   lambda ev: None)
    try:
        while e.seqs[sid].state != "decode":
            e.step()
        for a in actions(sid):
            e.handle.apply(a)
        for _ in range(steps):
            e.step()
    finally:
        e.on_logits = None
        e.cancel(sid)
    return torch.stack(logits)


def test_logits_match_transformers_on_gpu(gpu_engine):
    e = gpu_engine
    ids = torch.randint(0, 49152, (700,), generator=torch.Generator().manual_seed(1)).tolist()
    got = run(e, ids, steps=0)[0]  # the prefill's logits
    e.model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            ref = e.model(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1].cpu()
    finally:
        e.model.set_attn_implementation("kvctl")
    assert float((got - ref).abs().max()) < 1e-3


def test_exact_offload_identical_and_quantized_decode_close_on_gpu(gpu_engine):
    """Bit-identical needs the same kernels on both sides: offloaded steps run eager,
    and a graph replays the start-up width (128 columns, other split-K partials than
    the eager step's 29), so the graphs are off here (test_cuda_graphs compares them)."""
    e = gpu_engine
    graphs, e.runner.graphs = e.runner.graphs, None
    try:
        _offload_and_quantize(e)
    finally:
        e.runner.graphs = graphs


def _offload_and_quantize(e):
    ids = torch.randint(0, 49152, (900,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = run(e, ids)
    n = -(-900 // e.geom.block_size) - 1
    off = run(e, ids, lambda s: [Offload(s, tuple(range(n)))])
    assert torch.equal(ref, off)
    topk = run(e, ids, lambda s: [SetDecodeMode(s, "topk", n), Offload(s, tuple(range(n)))])
    assert float((ref - topk).abs().max()) < 1e-3
    q8 = run(e, ids, lambda s: [Quantize(s, tuple(range(n)), 8)])
    assert float((ref[1] - q8[1]).abs().max()) < 0.05 * float(ref[1].abs().max())
    e.store.clear_cache()
    for a in e.store.arenas.values():
        assert a.alloc.num_slots == 0


def test_decode_logits_match_transformers_on_gpu(gpu_engine):
    """Two sequences decoding together on the GPU (the Triton kernel, its launches shared
    by the layers of each step): every step's logits equal transformers' over the same
    tokens."""
    from engine.api import FinishEvent
    e = gpu_engine
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (300, 77)]
    logits, done = {}, {}
    e.on_logits = lambda sids, lg: [logits.setdefault(s, []).append(lg[i].float().cpu())
                                    for i, s in enumerate(sids)]
    sids = [e.submit(Request(prompt_ids=p, sampling=SamplingParams(max_tokens=6,
                                                                   ignore_eos=True)),
                     lambda ev: done.__setitem__(ev.seq_id, ev.token_ids)
                     if isinstance(ev, FinishEvent) else None) for p in prompts]
    try:
        while len(done) < 2:
            e.step()
    finally:
        e.on_logits = None
    e.model.set_attn_implementation("sdpa")
    try:
        for sid, p in zip(sids, prompts):
            out = done[sid]
            assert len(out) == 6 and len(logits[sid]) == 6
            with torch.inference_mode():
                ref = e.model(input_ids=torch.tensor([p + out[:-1]], device="cuda")).logits[0]
            ref = ref[len(p) - 1:].float().cpu()                       # [6, V]
            assert float((torch.stack(logits[sid]) - ref).abs().max()) < 1e-3
    finally:
        e.model.set_attn_implementation("kvctl")


def test_chunks_over_stored_tokens_in_bf16_match_the_masked_path_on_gpu(monkeypatch):
    """bf16 (the flash kernel's dtype): a prompt's first chunk (plain causal) and a later
    chunk over the stored tokens (causal from the bottom right) attend with grouped kv heads
    as they are (``enable_gqa``), and give the logits of the path that repeats K/V per
    query head under a built [n, M] mask."""
    import engine.plan as plan_mod
    import engine.runner as runner_mod
    from engine.engine import Engine, EngineConfig
    e = Engine(EngineConfig(model="random:smollm2-135m", device="cuda", dtype="bfloat16",
                            kv_budget_bytes=1 << 30, max_batch_tokens=2048,
                            prefix_caching=False))
    try:
        g = torch.Generator().manual_seed(4)
        ids = torch.randint(0, 49152, (1500,), generator=g).tolist()
        real_build = plan_mod.build_plan
        seen = []

        def spy(*a, **k):
            p = real_build(*a, **k)
            seen.extend((s.plain_causal, s.tail_causal) for s in p.prefills)
            return p
        monkeypatch.setattr(runner_mod, "build_plan", spy)
        first = e.prefill("a", ids[:1100], logits="last")
        fast = e.extend("a", ids[1100:], logits="last")
        assert seen == [(True, False), (False, True)]

        def masked(*a, **k):
            p = real_build(*a, **k)
            for s in p.prefills:
                s.plain_causal = s.tail_causal = False
            return p
        monkeypatch.setattr(runner_mod, "build_plan", masked)
        first_m = e.prefill("b", ids[:1100], logits="last")
        slow = e.extend("b", ids[1100:], logits="last")
        for a, b in ((first, first_m), (fast, slow)):
            a, b = a.float().cpu(), b.float().cpu()
            assert float((a - b).abs().max()) < 0.03 * float(b.abs().max())
    finally:
        e.stop()
