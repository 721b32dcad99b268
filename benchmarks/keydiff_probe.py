"""Where the needle's block ranks by key distinctness (KeyDiff, Park et al. 2025), before
any question is asked: the probe behind engine/plan.py's distinct score (issue 15).

    python -m benchmarks.keydiff_probe [--samples 3] [--lengths 1024,2048]

Default model through plain transformers (fp32, its own cache, post-RoPE keys).
Per prompt of the headline suite's passkey / two-needle tasks and per 32-token block:
``token max``: per layer and head the largest ``-cos(key, mean key)`` among the block's
keys, averaged over heads, summed over layers (what the engine computes);
``block mean``: ``-cos(block's mean key, mean key)`` instead. Prints the rank of the
needle's (first) block under each (0 = first; the sink block is nearly always 0).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

T = 32


def scores(pkv, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    nb = (n + T - 1) // T
    tok, blk = torch.zeros(nb), torch.zeros(nb)
    for layer in pkv.layers:
        k = layer.keys[0].float()                       # [H, N, D]
        H, N, D = k.shape
        pad = nb * T - N
        mean = k.mean(1, keepdim=True)
        away = F.pad(-F.cosine_similarity(k, mean, dim=-1), (0, pad), value=-9.0)
        tok += away.view(H, nb, T).amax(2).mean(0)
        kk = F.pad(k, (0, 0, 0, pad))
        cnt = torch.full((nb,), float(T))
        cnt[-1] = T - pad
        bm = kk.view(H, nb, T, D).sum(2) / cnt.view(1, nb, 1)
        blk += (-F.cosine_similarity(bm, mean, dim=-1)).mean(0)
    return tok, blk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--lengths", default="1024,2048")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.headline import tasks
    from engine.models import default_model_dir
    d = default_model_dir()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    lengths = [int(x) for x in a.lengths.split(",") if x]
    for s in tasks.build(tok, ["passkey", "two_needles"], lengths, a.samples, 32, 1234, 0,
                         False):
        with torch.no_grad():
            out = model(torch.tensor([s.context_ids]), use_cache=True)
        t, b = scores(out.past_key_values, len(s.context_ids))
        first = (s.meta.get("needle_tokens") or [s.meta["needle_token"]])[0] // T
        rank = lambda x: int((x.argsort(descending=True) == first).nonzero())  # noqa: E731
        print(f"{s.id}: needle block {first} of {len(t)}; rank by token max {rank(t)}, "
              f"by block mean {rank(b)}")


if __name__ == "__main__":
    main()
