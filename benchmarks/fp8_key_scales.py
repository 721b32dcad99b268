"""Study: fp8 keys with one scale per (block, kv head) -- the shipped layout -- against one
scale per (block, kv head, channel), on the default model's perplexity.

    python -m benchmarks.fp8_key_scales --length 2048 --windows 6 --threads 1

Per-channel key scales are simulated: the keys are stored at full precision after an fp8
round trip with per-channel scales (format 'kfullvfp8', with the engine's quantize move's
write patched), the values as real fp8 blocks. The per-head variant is simulated the same
way, and the run checks that it equals the real 'fp8' format token for token, so the two
simulated rows differ only in the keys' scale granularity. Also: fp8 values alone and fp8
keys alone (real blocks). Paired per-token NLL differences (mean +- standard error)
decide; the chunked teacher-forced NLL is benchmarks/evaluate.py's.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from benchmarks.evaluate import ppl_text_ids, ppl_windows, teacher_forced_nll
from engine import moves
from engine.kernels.quant import FP8_MAX
from engine.layout import KVFormat


def fp8_round_trip(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """x [..., T, D] through e4m3 with one fp32 scale per slice over ``dims``."""
    xf = x.float()
    s = xf.abs().amax(dim=dims, keepdim=True) / FP8_MAX
    s = torch.where(s > 0, s, torch.ones_like(s))
    c = (xf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (c * s).to(x.dtype)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from engine.engine import Engine, EngineConfig
    eng = Engine(EngineConfig(model="default", device="cpu", dtype="float32", block_size=32,
                              max_batch_tokens=256, seed=1234))
    wins = ppl_windows(ppl_text_ids(eng.tokenizer), a.length, a.windows)
    write, keys = moves.write_blocks, {"dims": None}

    def patched(arena, offs, geom, fmt, k, v, anchor=None):
        if keys["dims"] is not None:
            k = fp8_round_trip(k, keys["dims"])
        return write(arena, offs, geom, fmt, k, v, anchor)

    moves.write_blocks = patched
    # Quantize refuses full-precision sides; this study stores keys-full formats
    moves.check_format = lambda bits, v_bits, fp8=False: KVFormat(
        bits, bits if v_bits is None else v_bits, fp8)
    nll = {}
    for label, fmt, dims in (("full", "full", None), ("fp8", "fp8", None),
                             ("keys per head", "kfullvfp8", (-2, -1)),
                             ("keys per channel", "kfullvfp8", (-2,)),
                             ("fp8 values only", "kfullvfp8", None),
                             ("fp8 keys only", "kfp8vfull", None)):
        keys["dims"] = dims
        t0 = time.perf_counter()
        nll[label] = torch.cat([teacher_forced_nll(eng, w, fmt, 256).scored
                                for _, w in wins]).double()
        print(f"{label:17s} PPL {math.exp(float(nll[label].mean())):.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    def paired(x, y):
        d = nll[x] - nll[y]
        return f"{float(d.mean()):+.5f} +- {float(d.std() / math.sqrt(d.numel())):.5f}"
    for label in list(nll)[1:]:
        print(f"{label:17s} NLL - full: {paired(label, 'full')}")
    print(f"per channel - per head: {paired('keys per channel', 'keys per head')} "
          f"({nll['full'].numel()} tokens)")
    same = torch.equal(nll["fp8"], nll["keys per head"])
    print(f"simulated per head == real fp8 token for token: {same}")


if __name__ == "__main__":
    main()
