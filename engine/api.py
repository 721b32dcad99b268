"""Requests and the events the engine streams back for them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


class Overloaded(RuntimeError):
    """The engine's waiting queue is full: retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class OutOfBlocks(RuntimeError):
    """No room in the KV store for the requested blocks."""


class EngineStopped(RuntimeError):
    """The engine is stopping or stopped and takes no more work."""


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 = greedy."""

    temperature: float = 0.0
    top_k: int = 0            # 0 = off
    top_p: float = 1.0        # 1 = off
    seed: int | None = None
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        self.stop = tuple(s for s in self.stop if s)


@dataclass
class Request:
    """One generation. Give ``prompt`` (raw text), ``messages`` (chat, rendered with the
    model's chat template) or ``prompt_ids``."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_ids: list[int] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0
    seq_id: str | None = None      # assigned by the engine when None
    strategy: str | None = None    # operator/request pin for the controller (opaque here)
    session_id: str | None = None  # multi-turn: the finished turn's KV is kept for the next

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.prompt, self.messages, self.prompt_ids))
        if given != 1:
            raise ValueError("give exactly one of prompt, messages, prompt_ids")
        if self.messages is not None:
            for m in self.messages:
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise ValueError("each chat message needs 'role' and 'content'")


@dataclass
class TokenEvent:
    seq_id: str
    token_id: int
    text: str                      # text delta (may be '' while a character is incomplete)
    index: int                     # 0-based index among generated tokens


@dataclass
class FinishEvent:
    seq_id: str
    reason: str                    # 'stop' (EOS / stop string), 'length', 'cancelled', 'error'
    text: str                      # full generated text
    token_ids: list[int]
    num_prompt_tokens: int
    num_generated: int
    kv_bytes_by_tier: dict[str, int]
    kv_bytes_by_format: dict[str, int]
    moves: list[str]               # strategy changes the sequence went through
    error: str = ""
    cached_tokens: int = 0         # prompt tokens whose KV was reused, not prefilled


Event = TokenEvent | FinishEvent
