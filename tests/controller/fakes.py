"""A tiny engine with the real Engine's surface (submit/cancel/tokenize/handle/start/stop,
sessions and drop_session) and no model: one token per ``token_interval_s`` per running
sequence, KV accounted in fixed-size blocks. The servicers and the daemon are tested
against it without torch.

Sessions as the real engine keeps them (engine/sessions.py): a turn with a session_id
reuses the full blocks its prompt shares with the session's kept tokens (all but the
prompt's last token may be reused here: an observe window of one), the kept KV is let go
when the turn is admitted, and the finished turn's KV (prompt + output but the last
token) is kept as the idle sequence ``session/<id>``. No prefix index beyond sessions."""
from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future
from typing import NamedTuple

from engine.actions import BlockView, CandidateResult, EngineSnapshot, SequenceView, TierView
from engine.api import FinishEvent, Request, TokenEvent

BLOCK_SIZE = 4
BYTES_PER_TOKEN = 1000
SESSION_PREFIX = "session/"    # engine/sessions.py: the idle sequence of a session


class FakeReuse(NamedTuple):     # engine.handle.PrefixReuse
    num_tokens: int
    gpu_bytes: int


def reusable(prompt: list[int], kept: list[int]) -> int:
    """Tokens of ``prompt`` whose KV ``kept`` holds: whole blocks of their common prefix,
    never the prompt's last token (its logits give the first new token)."""
    n = 0
    for a, b in zip(prompt[:len(prompt) - 1], kept):
        if a != b:
            break
        n += 1
    return n // BLOCK_SIZE * BLOCK_SIZE


class FakeHandle:
    def __init__(self, eng: "FakeEngine") -> None:
        self._e = eng

    def admission_bytes(self, num_prompt_tokens: int, kv_format: str | None = None) -> int:
        return self.estimate_bytes(num_prompt_tokens + BLOCK_SIZE, kv_format or "full")

    def estimate_bytes(self, num_tokens: int, fmt: str = "full") -> int:
        if fmt not in ("full", "int8", "int4", "int2"):
            raise ValueError(f"unknown KV format {fmt!r}")
        div = {"full": 1, "int8": 2, "int4": 4, "int2": 8}[fmt]
        blocks = -(-num_tokens // BLOCK_SIZE)
        return blocks * BLOCK_SIZE * BYTES_PER_TOKEN // div

    def prefix_reuse(self, prompt_ids: list[int], session_id: str | None = None) -> FakeReuse:
        """Only a session's own kept tokens are reusable here (kept on the "GPU": no new bytes)."""
        e = self._e
        with e.lock:
            sess = e.sessions.get(session_id or "")
            kept = list(sess["kept"]) if sess is not None else []
        return FakeReuse(reusable(list(prompt_ids), kept), 0)

    def submit_candidates(self, candidates) -> Future:
        """The fake holds no KV to move: every candidate is refused."""
        fut: Future = Future()
        fut.set_result([CandidateResult(tuple(c), error="the fake engine applies no moves")
                        for c in candidates])
        return fut

    def snapshot(self) -> EngineSnapshot:
        e = self._e
        with e.lock:
            seqs = [e._view(s) for s in e.seqs.values()]
            seqs += [e._idle_view(x) for x in e.sessions.values() if x["kept"]]
            used = sum(v.bytes_by_tier.get("gpu", 0) for v in seqs)
            tiers = {"gpu": TierView("gpu", "cpu", e.capacity, used, used, e.capacity - used),
                     "host": TierView("host", "cpu", e.host_capacity, 0, 0, e.host_capacity)}
            return EngineSnapshot(time.time(), e.step, "cpu", e.model_name, BLOCK_SIZE, 2, tiers,
                                  seqs, sum(s["state"] == "waiting" for s in e.seqs.values()),
                                  sum(s["state"] == "decode" for s in e.seqs.values()), 0, 0,
                                  e.rate, version=e.step, max_positions=e.max_context,
                                  prefix=dict(e.prefix), sessions=[e._session_view(x) for x in
                                                                   e.sessions.values()])


class FakeTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) % 256 for c in text]


class FakeEngine:
    def __init__(self, token_interval_s: float = 0.01, capacity: int = 1_000_000,
                 host_capacity: int = 500_000, max_context: int = 512) -> None:
        self.model_name = "fake"
        self.tokenizer = FakeTokenizer()
        self.handle = FakeHandle(self)
        self.interval = token_interval_s
        self.capacity = capacity
        self.host_capacity = host_capacity
        self.max_context = max_context
        self.lock = threading.RLock()
        self.seqs: dict[str, dict] = {}
        self.step = 0
        self.rate = 0.0
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.num_cancelled = 0
        self.fail_next: str | None = None   # the next submitted sequence fails with this error
        self.sessions: dict[str, dict] = {}
        self.prefix = {"hit_tokens": 0, "queried_tokens": 0, "indexed_blocks": 0,
                       "cached_blocks": 0, "shared_slots": 0, "cached_evicted": 0}

    @property
    def max_positions(self) -> int:
        """The model's context in tokens, as Engine.max_positions."""
        return self.max_context

    def tokenize(self, req: Request) -> list[int]:
        if req.prompt_ids is not None:
            return list(req.prompt_ids)
        if req.messages is not None:
            return self.tokenizer.encode("".join(m["content"] for m in req.messages)) + [1]
        return self.tokenizer.encode(req.prompt)

    def submit(self, req: Request, on_event, prompt_ids=None) -> str:
        ids = list(prompt_ids) if prompt_ids is not None else self.tokenize(req)
        if len(ids) >= self.max_context:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds the model's context of "
                             f"{self.max_context}")
        with self.lock:
            sid = req.seq_id or f"seq-{next(self._ids)}"
            if sid in self.seqs:
                raise ValueError(f"sequence id {sid!r} is already in use")
            cached = 0
            sess = self.sessions.get(req.session_id or "")   # made when a first turn ends
            if sess is not None:      # the turn takes what it matches; the rest goes
                cached = reusable(ids, sess["kept"])
                sess.update(kept=[], active=sid, reused=sess["reused"] + cached)
                sess["last_used"] = time.monotonic()
            self.prefix["queried_tokens"] += len(ids)
            self.prefix["hit_tokens"] += cached
            self.seqs[sid] = {"id": sid, "req": req, "prompt": ids, "out": [], "state": "decode",
                              "cb": on_event, "pinned": req.strategy, "fail": self.fail_next,
                              "cached": cached}
            self.fail_next = None
        return sid

    def drop_session(self, session_id: str) -> bool:
        with self.lock:
            return self.sessions.pop(session_id, None) is not None

    def cancel(self, seq_id: str) -> bool:
        with self.lock:
            s = self.seqs.get(seq_id)
            if s is None:
                return False
            self.num_cancelled += 1
            self._finish(s, "cancelled")
            return True

    def _finish(self, s: dict, reason: str, error: str = "") -> None:
        v = self._view(s)
        del self.seqs[s["id"]]
        self._end_turn(s, reason)
        s["cb"](FinishEvent(s["id"], reason, "".join(chr(97 + t % 26) for t in s["out"]),
                            list(s["out"]), len(s["prompt"]), len(s["out"]),
                            v.bytes_by_tier, v.bytes_by_format, [], error,
                            cached_tokens=s["cached"]))

    def _end_turn(self, s: dict, reason: str) -> None:
        """A session's turn ended: its KV is kept (a dropped session starts anew), or on
        an error the session goes unless it still keeps an earlier turn's KV."""
        sess_id = s["req"].session_id
        if not sess_id:
            return
        sess = self.sessions.get(sess_id)
        if reason == "error":
            if sess is not None and sess["active"] == s["id"]:
                sess["active"] = ""
                if not sess["kept"]:
                    del self.sessions[sess_id]
            return
        if sess is None:
            sess = self.sessions[sess_id] = {"id": sess_id, "created": time.monotonic(),
                                             "turns": 0, "reused": 0}
        sess.update(kept=(s["prompt"] + s["out"])[:-1], active="", turns=sess["turns"] + 1,
                    last_used=time.monotonic())

    def _idle_view(self, sess: dict) -> SequenceView:
        n = len(sess["kept"])
        return self._view({"id": SESSION_PREFIX + sess["id"], "state": "idle",
                           "prompt": sess["kept"], "out": [],
                           "req": Request(prompt_ids=sess["kept"] or [0])}, n)

    def _session_view(self, sess: dict) -> dict:
        now = time.monotonic()
        v = self._idle_view(sess) if sess["kept"] else None
        return {"session_id": sess["id"], "turns": sess["turns"],
                "seq_id": v.seq_id if v else "",
                "idle_s": now - sess.get("last_used", sess["created"]),
                "age_s": now - sess["created"], "active": sess["active"],
                "num_tokens": len(sess["kept"]), "reused_tokens": sess["reused"],
                "bytes_by_tier": v.bytes_by_tier if v else {},
                "bytes_by_format": v.bytes_by_format if v else {}}

    def _view(self, s: dict, n: int | None = None) -> SequenceView:
        n = len(s["prompt"]) + len(s["out"]) if n is None else n
        nblocks = -(-n // BLOCK_SIZE)
        blocks = [BlockView(i, min(BLOCK_SIZE, n - i * BLOCK_SIZE), "full", "gpu",
                            BLOCK_SIZE * BYTES_PER_TOKEN, 0.0) for i in range(nblocks)]
        nbytes = nblocks * BLOCK_SIZE * BYTES_PER_TOKEN
        return SequenceView(s["id"], s["state"], len(s["prompt"]), n, len(s["out"]),
                            s["req"].priority, "exact", 0, {"gpu": nbytes}, {"full": nbytes},
                            blocks, 0.0, 0.0, 0.0,
                            bytes_by_place={("gpu", "full"): nbytes} if nbytes else {})

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with self.lock:
                self.step += 1
                for s in list(self.seqs.values()):
                    t = (len(s["out"]) * 7 + 3) % 50
                    s["out"].append(t)
                    s["cb"](TokenEvent(s["id"], t, chr(97 + t % 26), len(s["out"]) - 1))
                    if s["fail"]:              # as Engine fails the sequences of a bad step
                        self._finish(s, "error", s["fail"])
                    elif len(s["out"]) >= s["req"].sampling.max_tokens:
                        self._finish(s, "length")
                self.rate = 1.0 / self.interval if self.seqs else 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
