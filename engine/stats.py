"""Per-sequence attention statistics, fed by the decode kernel's block partials.

Per logical block: decayed share of attention mass (heavy-hitter score, H2O, Zhang et
al. 2023), averaged over layers and query heads. Per sequence: entropy of the block
distribution, sink mass (first block), recent-window mass (newest blocks), and the
prompt's SnapKV observation-window scores (Li et al. 2024).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SeqStats:
    decay: float = 0.9
    recent_blocks: int = 2
    mass: torch.Tensor = field(default_factory=lambda: torch.zeros(0))   # [NB] decayed
    last_share: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    observed: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [NB] SnapKV
    distinct: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [NB] KeyDiff
    entropy: float = 0.0
    sink_mass: float = 0.0
    recent_mass: float = 0.0
    steps: int = 0                # decode steps seen
    seeded: bool = False          # statistics started from the prompt's window

    def rebase(self, attended: list[int]) -> None:
        """Blocks were evicted (or parked): only ``attended`` are read now. The smoothed
        entropy still spreads over the gone blocks (a normalized entropy above 1 for the
        blocks left); it becomes at most the entropy of the decayed mass over the blocks
        left, which is what the next steps converge to."""
        idx = [i for i in attended if i < self.mass.numel()]
        if not idx:
            return
        m = self.mass[idx].clamp_min(0)
        tot = float(m.sum())
        if tot <= 0:
            return
        p = m / tot
        self.entropy = min(self.entropy, float(-torch.special.xlogy(p, p).sum()))

    def update(self, share: torch.Tensor) -> None:
        """share [NB] (cpu, sums to 1 over attended blocks): one decode step."""
        update_batch([self], share.unsqueeze(0), [share.numel()])

    def _step(self, share: torch.Tensor, ent: float, sink: float, recent: float,
              mass: torch.Tensor) -> None:
        self.mass = mass              # the decayed mass, computed for the batch
        self.last_share = share
        # statistics themselves are smoothed with the same decay
        a = self.decay if self.steps or self.seeded else 0.0
        self.entropy = a * self.entropy + (1 - a) * ent
        self.sink_mass = a * self.sink_mass + (1 - a) * sink if share.numel() else 0.0
        self.recent_mass = a * self.recent_mass + (1 - a) * recent
        self.steps += 1

    def observe(self, window: torch.Tensor, accumulated: torch.Tensor,
                distinct: torch.Tensor | None = None) -> None:
        """Prompt-time scores: the observation window's (SnapKV) and every prompt
        query's accumulated attention (H2O), which also seeds the decayed mass; and the
        blocks' key distinctness (KeyDiff) as a share: each block's excess over the
        median block (the sink block, far from every mean, left out: it is kept
        anyway), so filler gets ~0 and the few blocks that stand out share 1."""
        self.observed = window / window.sum().clamp_min(1e-30)
        if distinct is not None and distinct.numel() > 2:
            body = distinct[1:]
            excess = (body - body.median()).clamp_min(0)
            self.distinct = torch.cat([torch.zeros(1), excess / excess.sum().clamp_min(1e-30)])
        self.mass = accumulated / accumulated.sum().clamp_min(1e-30)
        # the decode-time statistics start from the prompt's: the last queries' attention
        # is the best estimate of the next ones' (SnapKV's premise), so a move priced
        # right after prefill sees the sequence's distribution, not zeros outside every
        # range the learned predictor was trained on; decode steps then blend in
        p = self.observed
        if p.numel() and float(p.sum()) > 0:
            self.entropy = float(-torch.special.xlogy(p, p).sum())
            self.sink_mass = float(p[0])
            self.recent_mass = float(p[-self.recent_blocks:].sum()) if self.recent_blocks else 0.0
            self.seeded = True


def update_batch(stats: list[SeqStats], share: torch.Tensor, ns: list[int]) -> None:
    """One decode step for several sequences: ``share`` [B, NB] (cpu), row i holding
    sequence i's ``ns[i]`` block shares (columns past it are not its blocks). Entropy,
    sink and recent-window mass of all rows at once, then one host read: per sequence
    only its decayed mass is a tensor operation."""
    if not stats:
        return
    B = len(stats)
    n = torch.tensor([min(k, share.shape[1]) for k in ns], dtype=torch.long)
    col = torch.arange(share.shape[1])
    inside = col[None, :] < n[:, None]
    x = torch.where(inside, share, torch.zeros((), dtype=share.dtype))
    ent = -torch.special.xlogy(x, x).sum(1)                                   # 0 log 0 = 0
    sink = x[:, 0] if x.shape[1] else torch.zeros(B)
    # each row's newest blocks: columns n - 1, n - 2, ... (as many as its recent_blocks)
    j = torch.arange(max(s.recent_blocks for s in stats))
    back = n[:, None] - 1 - j                                                 # [B, r]
    want = (back >= 0) & (j < torch.tensor([s.recent_blocks for s in stats])[:, None])
    picked = x.gather(1, back.clamp_min(0)) if x.shape[1] else torch.zeros(want.shape)
    recent = (picked * want).sum(1)
    ent_l, sink_l, recent_l = ent.tolist(), sink.tolist(), recent.tolist()
    # the decayed masses of all rows at once: the previous ones padded (or cut) to the
    # row's blocks, then one multiply-add; each sequence keeps a view of its row
    W = x.shape[1]
    prev = torch.nn.utils.rnn.pad_sequence([st.mass for st in stats], batch_first=True)
    if prev.shape[1] >= W:
        prev = prev[:, :W]
    else:
        prev = torch.nn.functional.pad(prev, (0, W - prev.shape[1]))
    decay = torch.tensor([st.decay for st in stats], dtype=x.dtype)[:, None]
    mass = torch.where(inside, prev.to(x.dtype), torch.zeros((), dtype=x.dtype)) * decay \
        + (1 - decay) * x
    for i, (st, k, xr, mr) in enumerate(zip(stats, n.tolist(), x.unbind(0), mass.unbind(0))):
        if k < W:
            xr, mr = xr[:k], mr[:k]
        st._step(xr, ent_l[i], sink_l[i], recent_l[i], mr)
