"""Full precision through kvctl's engine equals transformers with its own cache."""
import torch
from transformers import DynamicCache

from engine.api import FinishEvent, Request, SamplingParams


def collect(engine, req):
    return [ev for ev in engine.generate(req)]


def test_logits_match_transformers_over_1k_prompt_and_32_steps(engine, hf_model, long_ids):
    ids = long_ids[:1000]
    with torch.inference_mode():
        cache = DynamicCache(config=hf_model.config)
        out = hf_model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
        ref, gen = [out.logits[0, -1]], [int(out.logits[0, -1].argmax())]
        for _ in range(32):
            out = hf_model(input_ids=torch.tensor([[gen[-1]]]), cache=cache, use_cache=True)
            ref.append(out.logits[0, -1])
            gen.append(int(out.logits[0, -1].argmax()))
    got = []
    engine.on_logits = lambda sids, lg: got.append(lg[0].clone())
    try:
        evs = collect(engine, Request(prompt_ids=ids,
                                      sampling=SamplingParams(max_tokens=33, ignore_eos=True)))
    finally:
        engine.on_logits = None
    assert evs[-1].token_ids == gen
    assert len(got) == 33
    err = max(float((g - r).abs().max()) for g, r in zip(got, ref))
    assert err < 1e-4, err


def test_batch_of_four_equals_each_alone_through_generate(engine, hf_model, long_ids):
    prompts = [long_ids[:37], long_ids[100:301], long_ids[400:403], long_ids[500:1011]]
    n = 24
    want = []
    with torch.inference_mode():
        for p in prompts:
            out = hf_model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False,
                                    min_new_tokens=n, pad_token_id=0)
            want.append(out[0, len(p):].tolist())
    done: dict[str, FinishEvent] = {}
    ids = [engine.submit(Request(prompt_ids=p, sampling=SamplingParams(max_tokens=n,
                                                                        ignore_eos=True)),
                         lambda ev: done.__setitem__(ev.seq_id, ev)
                         if isinstance(ev, FinishEvent) else None)
           for p in prompts]
    batched_steps = 0
    while len(done) < 4:
        batched_steps += len(engine.running) > 1
        engine.step()
    assert batched_steps > n // 2  # they really ran together
    for sid, w in zip(ids, want):
        assert done[sid].token_ids == w


def test_chat_messages_produce_a_coherent_answer(engine):
    evs = collect(engine, Request(messages=[{"role": "user",
                                             "content": "What is the capital of France?"}],
                                  sampling=SamplingParams(max_tokens=24)))
    text = "".join(ev.text for ev in evs[:-1])
    assert text == evs[-1].text
    # incremental detokenization gives exactly what decoding all the ids at once gives
    assert text == engine.tokenizer.decode(evs[-1].token_ids, skip_special_tokens=True)
    assert "Paris" in text


def test_streamed_text_equals_full_decode_on_long_generations(engine, long_ids):
    """Multi-byte characters and long outputs: the incremental deltas add up to the
    whole-ids decode."""
    for prompt in ("Écris un poème sur la mer, avec des accents: é, è, à, ç.",
                   "List ten emoji and their meanings:"):
        evs = list(engine.generate(Request(
            messages=[{"role": "user", "content": prompt}],
            sampling=SamplingParams(max_tokens=60, temperature=0.8, seed=3))))
        text = "".join(ev.text for ev in evs[:-1])
        assert text == evs[-1].text
        assert text == engine.tokenizer.decode(evs[-1].token_ids, skip_special_tokens=True)


def test_qkv_projections_are_fused_into_one_weight_without_a_copy(engine):
    """The logits above come from one Q/K/V GEMM a layer (engine.attention.fuse_qkv);
    q/k/v_proj stay usable as views of it, so the weights are held once."""
    layers = [m for m in engine.model.modules() if hasattr(m, "kvctl_qkv_weight")]
    assert len(layers) == engine.num_layers
    for m in layers:
        w = m.kvctl_qkv_weight
        assert w.shape[0] == sum(m.kvctl_qkv_sizes)
        start = 0
        for lin in (m.q_proj, m.k_proj, m.v_proj):
            assert lin.weight.data_ptr() == w[start:].data_ptr()
            start += lin.weight.shape[0]
