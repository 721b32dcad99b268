"""Engine-side state of one request: tokens, detokenization, stop checks, events."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.api import Event, FinishEvent, Request, TokenEvent

WAITING, PREFILL, DECODE, FINISHED = "waiting", "prefill", "decode", "finished"


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
    num_prefilled: int = 0
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0              # characters of text already streamed
    moves: list[str] = field(default_factory=list)
    finish_reason: str = ""

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
        full = tokenizer.decode(self.output_ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # an incomplete character: wait for its other bytes
            return False
        hit = False
        for s in self.sampling.stop:
            i = full.find(s, max(0, len(self.text) - len(s)))
            if i >= 0:
                full, hit = full[:i], True
                break
        self.text = full
        return hit

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
                           list(self.moves), error)
