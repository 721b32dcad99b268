"""What the 2-bit fit of one sequence's blocks costs on this machine (CPU by default):
quant.quantize_values_ref / quantize_keys_ref at 2 bits, two ways, alternating, best of
``--reps``, and whether both give the same codes; 4-bit (min/max) for scale. On the CPU:
the refined fit taken a chunk of groups at a time (``quant.FIT_CHUNK``, as shipped)
against all at once. On CUDA: the Triton fit (engine/kernels/fit_triton.py, as shipped)
against the torch passes.

    python -m benchmarks.fit_cost                    # the default model's shape, 1K tokens
    python -m benchmarks.fit_cost --layers 32 --kv-heads 8 --head-dim 128 --block 32 \\
        --tokens 8192 --device cuda                  # an 8B shape on a GPU (Triton fit)
"""
from __future__ import annotations

import argparse
import time

import torch

from engine.kernels import quant


def _time(fn, device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    n = a.layers * (a.tokens // a.block)
    x = torch.randn(n, a.kv_heads, a.block, a.head_dim, device=dev)
    from engine.kernels import fit_triton
    shipped = quant.FIT_CHUNK, fit_triton.supported
    ways = (("triton", shipped), ("torch", (shipped[0], lambda *_: False))) \
        if dev.type == "cuda" else (("chunked", shipped), ("whole", (1 << 62, shipped[1])))
    best: dict[tuple[str, str], float] = {}
    outs = {}
    for _ in range(a.reps):
        for label, (chunk, supported) in ways:
            quant.FIT_CHUNK, fit_triton.supported = chunk, supported
            for part, fn in (("values", lambda: quant.quantize_values_ref(
                    x, 2, a.group, torch.float16)),
                             ("keys", lambda: quant.quantize_keys_ref(x, 2, torch.float16))):
                dt, out = _time(fn, dev)
                best[(label, part)] = min(dt, best.get((label, part), float("inf")))
                outs[(label, part)] = out
    quant.FIT_CHUNK, fit_triton.supported = shipped
    print(f"{n} blocks ({a.tokens} tokens x {a.layers} layers), {a.kv_heads} kv heads x "
          f"{a.block} tokens x {a.head_dim} dims, {dev}, torch threads "
          f"{torch.get_num_threads()}; best of {a.reps}, ms:")
    (one, _), (two, _) = ways
    for part in ("values", "keys"):
        same = all(torch.equal(p, q) for p, q in zip(outs[(one, part)], outs[(two, part)]))
        # where the codes differ (ties, float order), which fit is closer: mean squared
        # error of the dequantized blocks against the input
        err = {w: float(((quant.dequantize_values_ref(*outs[(w, part)], 2, a.group,
                                                      torch.float32) if part == "values"
                          else quant.dequantize_keys_ref(*outs[(w, part)], 2, torch.float32))
                         - x).pow(2).mean()) for w in (one, two)}
        print(f"  2-bit {part}: {one} {best[(one, part)] * 1e3:.1f}, {two} "
              f"{best[(two, part)] * 1e3:.1f}, same codes: {same}, MSE {one} "
              f"{err[one]:.5f} / {two} {err[two]:.5f}")
    # for scale: 4 bits (min/max, no refined fit), as shipped
    for part, fn in (("values", lambda: quant.quantize_values_ref(x, 4, a.group,
                                                                  torch.float16)),
                     ("keys", lambda: quant.quantize_keys_ref(x, 4, torch.float16))):
        t = min(_time(fn, dev)[0] for _ in range(a.reps))
        print(f"  4-bit {part} (min/max): {t * 1e3:.1f}")


if __name__ == "__main__":
    main()
