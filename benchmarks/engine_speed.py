"""Engine speed benchmark: decode tokens/s vs transformers ``generate``, side by side.

    python -m benchmarks.engine_speed [--batches 1,4,8,16] [--prompt 1024] [--new 64] [--threads 2]

Same model, same machine, same run. Prints a markdown table (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch


def texts(tokenizer, n: int, count: int) -> list[list[int]]:
    import pydoc_data.topics as t
    body = " ".join(t.topics.values())
    ids = tokenizer(body)["input_ids"]
    return [ids[i * 997:i * 997 + n] for i in range(count)]


def bench_hf(model, prompt: list[int], new: int) -> float:
    """transformers generate (sdpa, its own cache), batch 1: decode tok/s (prefill time
    subtracted). Runs the engine's own model object with attention switched back."""
    x = torch.tensor([prompt], device=model.device)
    kw = dict(do_sample=False, pad_token_id=0, use_cache=True)
    impl = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        return _time_generate(model, x, new, kw)
    finally:
        model.set_attn_implementation(impl)
        model.config.use_cache = False


def _time_generate(model, x, new, kw) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        model.generate(x, max_new_tokens=4, min_new_tokens=4, **kw)  # warm up
        sync()
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        sync()
        t1 = time.perf_counter()
        model.generate(x, max_new_tokens=new, min_new_tokens=new, **kw)
        sync()
        t2 = time.perf_counter()
    return (new - 1) / ((t2 - t1) - (t1 - t0))


def bench_kvctl(engine, prompts: list[list[int]], new: int) -> float:
    """kvctl, all prompts running together: aggregate decode tok/s."""
    from engine.api import Request, SamplingParams
    sp = SamplingParams(max_tokens=1_000_000, ignore_eos=True)  # cancelled below
    ids = [engine.submit(Request(prompt_ids=p, sampling=sp), lambda ev: None) for p in prompts]
    while any(engine.seqs[i].state != "decode" for i in ids):
        engine.step()
    engine.step()  # warm
    t0 = time.perf_counter()
    made0 = sum(len(engine.seqs[i].output_ids) for i in ids)
    for _ in range(new - 2):
        engine.step()
    made = sum(len(engine.seqs[i].output_ids) for i in ids) - made0
    dt = time.perf_counter() - t0
    for i in ids:
        engine.cancel(i)
    return made / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from engine.engine import Engine, EngineConfig
    batches = [int(b) for b in a.batches.split(",")]
    eng = Engine(EngineConfig(model=a.model, device=a.device, dtype=a.dtype,
                              max_batch_tokens=2048))
    if eng.tokenizer is not None:
        prompts = texts(eng.tokenizer, a.prompt, max(batches))
    else:  # random-weight model: random ids
        g = torch.Generator().manual_seed(0)
        vocab = eng.model.config.vocab_size
        prompts = [torch.randint(0, vocab, (a.prompt,), generator=g).tolist()
                   for _ in range(max(batches))]
    hf1 = bench_hf(eng.model, prompts[0], a.new)
    where = torch.cuda.get_device_name() if eng.device.type == "cuda" else \
        (platform.processor() or platform.machine())
    print(f"# engine decode benchmark — {where}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, threads {a.threads}, "
          f"model {eng.model_name} ({eng.dtype}), prompt {a.prompt} tokens, {a.new} new")
    print()
    print("| system | batch | decode tok/s (aggregate) | vs transformers batch 1 |")
    print("|---|---|---|---|")
    print(f"| transformers generate | 1 | {hf1:.1f} | 1.00x |")
    for b in batches:
        r = bench_kvctl(eng, prompts[:b], a.new)
        print(f"| kvctl | {b} | {r:.1f} | {r / hf1:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
