"""Study: would a Hadamard rotation over the head dimension (QuaRot-style) make 2-bit
values good enough to spend 25% of fp16 bytes at int4's accuracy?

    python -m benchmarks.value_rotation --length 2048 --windows 4 --threads 2

For values the rotation costs nothing at run time (it folds into v_proj and o_proj's
weights), so it is the cheapest lever on the 2-bit values that dominate the loss at 25%
(docs/BENCHMARKS.md, "Is 25% reachable"). This measures the first thing it must move: the
relative squared error (sum (x_hat - x)^2 / sum x^2) of the engine's block quantizers
(engine/kernels/quant.py: keys per channel over a 32-token block, values per token over
32-channel groups, 2-bit fits included) on the default model's keys and values over
text windows, each block quantized as it is and rotated by the normalized Sylvester
Hadamard matrix first (then rotated back). Keys are listed too (a key rotation would
have to run after RoPE, at run time).
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.evaluate import ppl_text_ids, ppl_windows
from engine.kernels.quant import (dequantize_keys_ref, dequantize_values_ref,
                                  quantize_keys_ref, quantize_values_ref)


def hadamard(n: int) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix over sqrt(n) (orthonormal; n a power of two)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if h.shape[0] != n:
        raise ValueError(f"head dim {n} is not a power of two")
    return h / n ** 0.5


def rel_error(x: torch.Tensor, side: str, bits: int, rot: torch.Tensor | None) -> float:
    """x [N, H, T, D] blocks through one side's quantizer (rotated first with ``rot``)."""
    y = x @ rot if rot is not None else x
    if side == "k":
        c, s, z = quantize_keys_ref(y, bits, torch.float16)
        yd = dequantize_keys_ref(c, s, z, bits, torch.float32)
    else:
        c, s, z = quantize_values_ref(y, bits, 32, torch.float16)
        yd = dequantize_values_ref(c, s, z, bits, 32, torch.float32)
    xd = yd @ rot.T if rot is not None else yd
    return float(((xd - x) ** 2).sum() / (x ** 2).sum())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from engine.models import load_model
    lm = load_model("default", device="cpu", dtype="float32")
    wins = ppl_windows(ppl_text_ids(lm.tokenizer), a.length, a.windows)
    sums: dict[tuple, list[float]] = {}
    for off, ids in wins:
        with torch.no_grad():
            cache = lm.model(torch.tensor([ids]), use_cache=True).past_key_values
        for layer in cache.layers:
            for side, x in (("k", layer.keys), ("v", layer.values)):
                _, H, T, D = x.shape
                n = T // 32
                blocks = x[0, :, :n * 32].reshape(H, n, 32, D).transpose(0, 1).float()
                rot = hadamard(D)
                for bits in a.bits:
                    for r in (None, rot):
                        sums.setdefault((side, bits, r is not None), []).append(
                            rel_error(blocks, side, bits, r))
        print(f"window at {off}: done", flush=True)
    print(f"\n{len(wins)} windows of {a.length} tokens, every layer; relative squared error")
    print("| side | bits | as stored | Hadamard-rotated | ratio |")
    print("|---|---|---|---|---|")
    for side in ("k", "v"):
        for bits in a.bits:
            p = sum(sums[(side, bits, False)]) / len(sums[(side, bits, False)])
            r = sum(sums[(side, bits, True)]) / len(sums[(side, bits, True)])
            print(f"| {'keys' if side == 'k' else 'values'} | {bits} | {p:.4f} | {r:.4f} | "
                  f"{r / p:.2f} |")


if __name__ == "__main__":
    main()
