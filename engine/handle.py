"""EngineHandle: the controller's only door into the engine (snapshots in, moves out).

Reads never wait for a forward pass: ``snapshot()`` returns the newest snapshot the
engine thread published. Writes are posted: ``submit_candidates`` hands the engine a
list of candidates (each the actions of one strategy on one sequence), which the engine
thread applies between two steps, each whole or not at all, and answers through a
future. ``apply`` is the one-action, wait-for-it form.
"""
from __future__ import annotations

from concurrent.futures import Future

from engine.actions import Action, ActionError, ActionResult, CandidateResult, EngineSnapshot
from engine.layout import KVFormat


class EngineHandle:
    def __init__(self, engine):
        self._e = engine

    def estimate_bytes(self, num_tokens: int, fmt: str = "full") -> int:
        return self._e.store.estimate_bytes(num_tokens, KVFormat.parse(fmt))

    def admission_bytes(self, num_prompt_tokens: int) -> int:
        """GPU-tier bytes admitting a prompt takes at once (its blocks at full precision
        plus one to grow into): a prompt above the tier's capacity can never run."""
        return self._e._admission_bytes(num_prompt_tokens)

    def snapshot(self) -> EngineSnapshot:
        return self._e.snapshot()

    def submit_candidates(self, candidates: list[tuple[Action, ...]]) -> Future:
        """Queue candidates for the engine thread; the future's result is one
        ``CandidateResult`` per candidate, in order."""
        cands = [tuple(c) for c in candidates]
        return self._e.post(lambda: self._e.apply_candidates(cands))

    def apply_candidates(self, candidates: list[tuple[Action, ...]],
                         timeout: float | None = None) -> list[CandidateResult]:
        return self.submit_candidates(candidates).result(timeout)

    def apply(self, action: Action, timeout: float | None = None) -> ActionResult:
        """One action, waited for; raises ActionError (nothing changed) if refused."""
        res = self.apply_candidates([(action,)], timeout)[0]
        if not res.ok:
            raise ActionError(res.error)
        return res.results[0]


def open_engine(config):
    """Load the model and build an engine from an ``engine.config.EngineConfig`` (heavy:
    torch, the weights). The daemon and ``kvctl train`` start engines through here."""
    from engine.engine import Engine

    return Engine(config)
