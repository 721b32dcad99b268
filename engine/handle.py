"""EngineHandle: the controller's only door into the engine (snapshots in, moves out).

Reads never wait for a forward pass: ``snapshot()`` returns the newest snapshot the
engine thread published. Writes are posted: ``submit_candidates`` hands the engine a
list of candidates (each the actions of one strategy on one sequence), which the engine
thread applies between two steps, each whole or not at all, and answers through a
future. ``apply`` is the one-action, wait-for-it form.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import NamedTuple

from engine.actions import (Action, ActionError, ActionResult, CandidateResult, EngineSnapshot,
                            parse_fill_format)
from engine.layout import KVFormat
from engine.sessions import match_prompt
from engine.store import GPU


class PrefixReuse(NamedTuple):
    """What a prompt would take from the prefix cache if it were admitted now."""

    num_tokens: int    # leading prompt tokens whose KV would be shared, not prefilled
    gpu_bytes: int     # bytes of those blocks that would newly count as used on the GPU
                       # tier: cached ones no sequence holds (counted free now) and
                       # offloaded ones admission fetches back


class EngineHandle:
    def __init__(self, engine):
        self._e = engine

    def estimate_bytes(self, num_tokens: int, fmt: str = "full") -> int:
        return self._e.store.estimate_bytes(num_tokens, KVFormat.parse(fmt))

    def admission_bytes(self, num_prompt_tokens: int, kv_format: str | None = None) -> int:
        """GPU-tier bytes admitting a prompt needs room for at once (its blocks at full
        precision plus one to grow into; with a ``kv_format``, the blocks in it plus a
        prefill chunk at full precision): a prompt above the tier's capacity can never
        run. ValueError for a format the engine does not write."""
        return self._e._admission_bytes(num_prompt_tokens, parse_fill_format(kv_format))

    def prefix_reuse(self, prompt_ids: list[int], session_id: str | None = None) -> PrefixReuse:
        """The blocks of ``prompt_ids`` admission would reuse now, by the rule of
        ``SessionsMixin._admit_fresh`` (engine/sessions.py): full blocks before the last
        ``observe_window`` tokens (at least one), matched in the prefix index; quantized
        ones only if ``session_id``'s own KV holds them.

        Read-only and off the engine thread: it hashes the prompt here and looks the
        keys up in the live index dicts (CPython's dict ``get`` is atomic) without the
        step lock, so the answer may be a step stale, and admission may take fewer
        blocks (room to fetch offloaded ones back, the staging limit)."""
        e = self._e
        if not e.config.prefix_caching:
            return PrefixReuse(0, 0)
        store = e.store
        T = store.block_size
        _, entries = match_prompt(store, prompt_ids, e.config.observe_window, session_id)
        layers = store.num_layers
        new_gpu = sum(store.geom.slot_bytes(x.fmt) * layers for x in entries
                      if x.cached or x.tier != GPU)
        return PrefixReuse(len(entries) * T, new_gpu)

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
