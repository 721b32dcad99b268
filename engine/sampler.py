"""Token sampling: greedy, temperature, top-k, top-p, per-request seed."""
from __future__ import annotations

import torch

from engine.api import SamplingParams
from engine.plan import ints_on


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else torch.seed() % (2**63))
    return g


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int]:
    """logits [R, V] -> one token id per row, row i with params[i] / generators[i]; the
    ids reach the host in one copy, not one synchronizing read per row."""
    return sample_tokens(logits, params, generators).tolist()


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """``sample_batch`` left on the logits' device: [R] int64, nothing read back (the
    engine feeds them to a step launched before it reads them).

    Greedy rows take one argmax together; sampled rows are drawn one by one (each has its
    own generator)."""
    R = len(params)
    if R == 0:
        return torch.zeros(0, dtype=torch.long, device=logits.device)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    if len(greedy) == R:
        return torch.argmax(logits, dim=-1)
    out = torch.empty(R, dtype=torch.long, device=logits.device)
    if greedy:
        idx = ints_on(logits.device, greedy)      # queued: no wait for the GPU
        out.index_copy_(0, idx, torch.argmax(logits.index_select(0, idx), dim=-1))
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.temperature != 0:
            out[i:i + 1] = _draw(logits[i], p, g)
    return out


def _draw(logits: torch.Tensor, params: SamplingParams,
          generator: torch.Generator | None) -> torch.Tensor:
    """logits [V] -> [1] token id on the logits' device (temperature > 0)."""
    x = logits.float()
    # shift before dividing: a tiny temperature (1e-38) overflowed logits / T to inf and
    # softmax to NaN (multinomial raised, failing the whole step); shifted, the top logit
    # is 0 and the rest at worst -inf, the greedy limit
    x = (x - x.max()) / params.temperature
    if params.top_k and params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, -1)
        # drop tokens once the mass before them already reaches top_p (keep at least one)
        drop = (torch.cumsum(probs, -1) - probs) >= params.top_p
        x = x.scatter(0, order, sorted_x.masked_fill(drop, float("-inf")))
    probs = torch.softmax(x, -1)
    return torch.multinomial(probs, 1, generator=generator)
