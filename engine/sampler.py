"""Token sampling: greedy, temperature, top-k, top-p, per-request seed."""
from __future__ import annotations

import torch

from engine.api import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else torch.seed() % (2**63))
    return g


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None) -> int:
    """logits [V] -> token id."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    x = logits.float() / params.temperature
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
    return int(torch.multinomial(probs, 1, generator=generator))
