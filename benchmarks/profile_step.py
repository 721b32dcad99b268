"""Where an engine decode step's time goes: ms per step, then the Python profile of some
steps (cProfile, by own time) and, on CUDA, the kernels launched per step.

    python benchmarks/profile_step.py --model random:smollm2-135m --batch 64 --prompt 32
    python benchmarks/profile_step.py --model random:thin30 --device cpu     # Python overhead only

``random:thin30`` is a 30-layer model with hidden size 64 (compute is negligible, so what
is left is the engine's and the model's per-layer overhead). Not a test.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine import models  # noqa: E402

models.RANDOM_CONFIGS.setdefault("thin30", dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=30, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=8192))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:thin30")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--ab-launch-cache", type=int, default=0, metavar="ROUNDS",
                    help="instead: alternate Triton launches with and without the per-step "
                    "reuse, ROUNDS rounds of --steps steps each, and print both medians")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from engine.api import Request, SamplingParams
    from engine.engine import Engine, EngineConfig
    eng = Engine(EngineConfig(model=a.model, device=a.device, max_batch_tokens=8192))
    cuda = eng.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(0)
    vocab = eng.model.config.vocab_size
    sp = SamplingParams(max_tokens=1_000_000, ignore_eos=True)
    ids = [eng.submit(Request(prompt_ids=torch.randint(0, vocab, (a.prompt,), generator=g)
                              .tolist(), sampling=sp), lambda ev: None) for _ in range(a.batch)]
    while any(eng.seqs[i].state != "decode" for i in ids):
        eng.step()
    for _ in range(3):
        eng.step()
    sync()

    def timed() -> float:
        t0 = time.perf_counter()
        for _ in range(a.steps):
            eng.step()
        sync()
        return (time.perf_counter() - t0) / a.steps

    if a.ab_launch_cache:
        from engine.kernels import decode_launch
        from engine.kernels import paged_decode_triton as pdt
        launch, plan = decode_launch.launch, pdt._plan_launch
        on, off = [], []
        for _ in range(a.ab_launch_cache):
            on.append(timed())
            decode_launch.launch = lambda fn, grid, args, consts, options, cache: launch(
                fn, grid, args, consts, options, None)
            pdt._plan_launch = lambda q, geom, fmt, B, NB, kw, cache, fmt2=None: plan(
                q, geom, fmt, B, NB, kw, None, fmt2)
            off.append(timed())
            decode_launch.launch, pdt._plan_launch = launch, plan
        med = lambda xs: sorted(xs)[len(xs) // 2] * 1e3  # noqa: E731
        print(f"{eng.model_name} on {eng.device}, batch {a.batch}, prompt {a.prompt}: "
              f"launch reuse {med(on):.2f} ms/step, without {med(off):.2f} ms/step "
              f"(medians of {a.ab_launch_cache} interleaved rounds of {a.steps} steps; "
              f"{med(off) / med(on):.3f}x)")
        return
    plain = timed()
    print(f"{eng.model_name} on {eng.device}, batch {a.batch}, prompt {a.prompt}: "
          f"{plain * 1e3:.2f} ms/step, {a.batch / plain:.0f} tokens/s")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(a.steps):
        eng.step()
    sync()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(a.top)
    if cuda:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                eng.step()
            sync()
        kernels = collections.Counter()
        gpu_us = 0.0
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernels[e.name[:60]] += 1
                gpu_us += e.device_time
        n = sum(kernels.values())
        print(f"CUDA kernels per step: {n / 5:.0f}; GPU busy {gpu_us / 5 / 1e3:.2f} ms of "
              f"{plain * 1e3:.2f} ms per step")
        for name, c in kernels.most_common(25):
            print(f"  {c / 5:7.1f}  {name}")
    for i in ids:
        eng.cancel(i)


if __name__ == "__main__":
    main()
