"""A tiny engine with the real Engine's surface (submit/cancel/tokenize/handle/start/stop)
and no model: one token per ``token_interval_s`` per running sequence, KV accounted in
fixed-size blocks. The servicers and the daemon are tested against it without torch."""
from __future__ import annotations

import itertools
import threading
import time

from concurrent.futures import Future

from engine.actions import BlockView, CandidateResult, EngineSnapshot, SequenceView, TierView
from engine.api import FinishEvent, Request, TokenEvent

BLOCK_SIZE = 4
BYTES_PER_TOKEN = 1000


class FakeHandle:
    def __init__(self, eng: "FakeEngine") -> None:
        self._e = eng

    def admission_bytes(self, num_prompt_tokens: int) -> int:
        return self.estimate_bytes(num_prompt_tokens + BLOCK_SIZE)

    def estimate_bytes(self, num_tokens: int, fmt: str = "full") -> int:
        if fmt not in ("full", "int8", "int4", "int2"):
            raise ValueError(f"unknown KV format {fmt!r}")
        div = {"full": 1, "int8": 2, "int4": 4, "int2": 8}[fmt]
        blocks = -(-num_tokens // BLOCK_SIZE)
        return blocks * BLOCK_SIZE * BYTES_PER_TOKEN // div

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
            used = sum(v.bytes_by_tier.get("gpu", 0) for v in seqs)
            tiers = {"gpu": TierView("gpu", "cpu", e.capacity, used, used, e.capacity - used),
                     "host": TierView("host", "cpu", e.host_capacity, 0, 0, e.host_capacity)}
            return EngineSnapshot(time.time(), e.step, "cpu", e.model_name, BLOCK_SIZE, 2, tiers,
                                  seqs, sum(s["state"] == "waiting" for s in e.seqs.values()),
                                  sum(s["state"] == "decode" for s in e.seqs.values()), 0, 0,
                                  e.rate, version=e.step, max_positions=e.max_context)


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
            self.seqs[sid] = {"id": sid, "req": req, "prompt": ids, "out": [], "state": "decode",
                              "cb": on_event, "pinned": req.strategy, "fail": self.fail_next}
            self.fail_next = None
        return sid

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
        s["cb"](FinishEvent(s["id"], reason, "".join(chr(97 + t % 26) for t in s["out"]),
                            list(s["out"]), len(s["prompt"]), len(s["out"]),
                            v.bytes_by_tier, v.bytes_by_format, [], error))

    def _view(self, s: dict) -> SequenceView:
        n = len(s["prompt"]) + len(s["out"])
        nblocks = -(-n // BLOCK_SIZE)
        blocks = [BlockView(i, min(BLOCK_SIZE, n - i * BLOCK_SIZE), "full", "gpu",
                            BLOCK_SIZE * BYTES_PER_TOKEN, 0.0) for i in range(nblocks)]
        nbytes = nblocks * BLOCK_SIZE * BYTES_PER_TOKEN
        return SequenceView(s["id"], s["state"], len(s["prompt"]), n, len(s["out"]),
                            s["req"].priority, "exact", 0, {"gpu": nbytes}, {"full": nbytes},
                            blocks, 0.0, 0.0, 0.0)

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
