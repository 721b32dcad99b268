"""Engine-side state of one request: tokens, detokenization, stop checks, events."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.actions import FULL, KVFormat
from engine.api import Event, FinishEvent, Request, TokenEvent

WAITING, PREFILL, DECODE, FINISHED = "waiting", "prefill", "decode", "finished"
HELD = "held"            # prefilled and kept, never scheduled: driven by prefill/append
IDLE = "idle"            # a session's KV between turns (engine/sessions.py)
PREEMPTED = "preempted"  # in the waiting queue again: KV swapped to host or dropped


@dataclass
class Sequence:
    seq_id: str
    request: Request
    prompt_ids: list[int]
    on_event: Callable[[Event], None]
    generator: torch.Generator | None
    arrival: float = field(default_factory=time.monotonic)
    state: str = WAITING
    stalled: bool = False         # wanted a block this step and none was free
    stalled_since: float = 0.0    # monotonic time the current stall began
    deferred: bool = False        # skipped a decode step: its offloaded blocks did not fit
    # the staging left after other sequences' (it goes first next step; not a stall: no
    # KV room is missing)
    num_prefilled: int = 0        # tokens of ``context_ids`` already in the KV store
    context_ids: list[int] = field(default_factory=list)  # what prefill writes: the
    # prompt; after a preemption that dropped the KV, prompt + tokens generated so far
    swapped: list[int] = field(default_factory=list)  # blocks preemption moved to host
    num_preemptions: int = 0
    admitted: bool = False        # admitted once (it no longer counts as queued)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0              # characters of text already streamed
    prefix_off: int = 0           # detokenization window over output_ids
    read_off: int = 0
    moves: list[str] = field(default_factory=list)
    finish_reason: str = ""
    block_hashes: list[bytes] = field(default_factory=list)  # digests of its full blocks
    cached_tokens: int = 0        # prompt tokens reused from the prefix index
    fill_format: KVFormat = FULL  # the request's kv_format (engine/api.py)

    def __post_init__(self) -> None:
        if not self.context_ids:
            self.context_ids = list(self.prompt_ids)

    @property
    def priority(self) -> int:
        return self.request.priority

    @property
    def sampling(self):
        return self.request.sampling

    def add_token(self, token_id: int, tokenizer) -> bool:
        """Record a sampled token and update the text; True if a stop string hit
        (the text is then cut before it)."""
        self.output_ids.append(token_id)
        if tokenizer is None:
            return False
        # incremental detokenization (as TGI and vLLM do): decode a short window, not the
        # whole output each token; this runs for every sequence of every step
        ids = self.output_ids
        prefix = tokenizer.decode(ids[self.prefix_off:self.read_off], skip_special_tokens=True)
        new = tokenizer.decode(ids[self.prefix_off:], skip_special_tokens=True)
        if len(new) <= len(prefix) or new.endswith("\ufffd"):
            return False  # nothing visible yet, or an incomplete character
        self.prefix_off, self.read_off = self.read_off, len(ids)
        full = self.text + new[len(prefix):]
        hit = False
        for s in self.sampling.stop:
            i = full.find(s, max(0, len(self.text) - len(s)))
            if i >= 0:
                full, hit = full[:i], True
                break
        self.text = full
        return hit

    def flush_text(self, tokenizer) -> None:
        """At the end (not on a stop string): text still held back as an incomplete
        character joins, as decoding all the ids at once would show it."""
        if tokenizer is None or self.read_off == len(self.output_ids):
            return
        ids = self.output_ids
        prefix = tokenizer.decode(ids[self.prefix_off:self.read_off], skip_special_tokens=True)
        new = tokenizer.decode(ids[self.prefix_off:], skip_special_tokens=True)
        self.text += new[len(prefix):]
        self.prefix_off = self.read_off = len(ids)

    def emit_token(self, final: bool) -> None:
        """Stream the newest token with its text delta. Text that could still turn into
        a stop string is held back until it cannot (or the sequence ends)."""
        hold = 0 if final else max((len(s) - 1 for s in self.sampling.stop), default=0)
        upto = max(self.emitted, len(self.text) - hold)
        delta, self.emitted = self.text[self.emitted:upto], upto
        self.on_event(TokenEvent(self.seq_id, self.output_ids[-1], delta,
                                 len(self.output_ids) - 1))

    def finish_event(self, reason: str, by_tier: dict, by_fmt: dict, error: str = ""
                     ) -> FinishEvent:
        return FinishEvent(self.seq_id, reason, self.text, list(self.output_ids),
                           len(self.prompt_ids), len(self.output_ids), by_tier, by_fmt,
                           list(self.moves), error, self.cached_tokens)
