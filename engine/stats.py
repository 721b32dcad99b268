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
    entropy: float = 0.0
    sink_mass: float = 0.0
    recent_mass: float = 0.0
    steps: int = 0

    @staticmethod
    def _fit(t: torch.Tensor, n: int) -> torch.Tensor:
        if t.numel() >= n:
            return t[:n]
        return torch.cat([t, torch.zeros(n - t.numel(), dtype=t.dtype)])

    def update(self, share: torch.Tensor) -> None:
        """share [NB] (cpu, sums to 1 over attended blocks): one decode step."""
        n = share.numel()
        self.mass = self._fit(self.mass, n) * self.decay + (1 - self.decay) * share
        self.last_share = share
        p = share[share > 0]
        ent = float(-(p * p.log()).sum()) if p.numel() else 0.0
        # statistics themselves are smoothed with the same decay
        a = self.decay if self.steps else 0.0
        self.entropy = a * self.entropy + (1 - a) * ent
        self.sink_mass = a * self.sink_mass + (1 - a) * float(share[0]) if n else 0.0
        self.recent_mass = a * self.recent_mass + (1 - a) * float(share[-self.recent_blocks:].sum())
        self.steps += 1

    def observe(self, window: torch.Tensor, accumulated: torch.Tensor) -> None:
        """Prompt-time scores: the observation window's (SnapKV) and every prompt
        query's accumulated attention (H2O), which also seeds the decayed mass."""
        self.observed = window / window.sum().clamp_min(1e-30)
        self.mass = accumulated / accumulated.sum().clamp_min(1e-30)
