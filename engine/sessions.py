"""Prefix reuse at admission and multi-turn sessions (issue 16), on the engine thread.

*Reuse*: a request's prompt is cut into full blocks and hashed (engine/prefix.py); the
leading blocks the index holds are shared into the new sequence (in their format and
tier) and only the rest is prefilled. At least the prompt's last token is always
computed: its logits give the first sampled token. Full blocks of every running
sequence are indexed as they fill; when a sequence ends, its indexed blocks stay cached
(the index holds them) until an allocation needs the room.

*Sessions*: a request with a ``session_id`` leaves its KV behind when it ends, as the
session's *idle* sequence ``session/<id>`` (state 'idle'): in snapshots, movable by
the controller like any sequence (offload, quantize, evict, or ``DropSession``), and
found by the next turn's prompt through the index (the next turn's prompt is the
conversation so far, so it matches every block the last turn left). The next turn
takes the blocks it matches, offloaded ones fetched back when the GPU tier has room,
and the idle sequence is let go. Idle sessions expire after ``session_ttl_s``; beyond
``max_sessions`` the least recently used one goes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from engine import moves
from engine.actions import ActionError
from engine.api import Request
from engine.arena import OutOfBlocks
from engine.layout import FULL
from engine.prefix import block_digests, key_of
from engine.sequence import IDLE, PREFILL, Sequence
from engine.staging import staging_need
from engine.store import GPU, HOST

log = logging.getLogger("kvctl.engine")

SESSION_PREFIX = "session/"
EXPIRY_EVERY_S = 1.0


def holder_id(session_id: str) -> str:
    return SESSION_PREFIX + session_id


def match_prompt(store, ids: list[int], observe_window: int,
                 session_id: str | None = None) -> tuple[list[bytes], list]:
    """The rule admission reuses by: the digests of the prompt's full blocks before its
    last ``observe_window`` tokens (at least one: their attention gives the prompt-time
    statistics, the last one's logits the first token) and the leading index entries
    they match, quantized ones only where ``session_id``'s own idle KV holds them.
    Reads only (``EngineHandle.prefix_reuse`` calls it off the engine thread: the block
    list is copied before it is read)."""
    digests = block_digests(ids, store.block_size, upto=len(ids) - max(1, observe_window))
    kv = store.seqs.get(holder_id(session_id)) if session_id else None
    own = frozenset(store.slot_key(b) for b in list(kv.blocks)
                    if b.offset >= 0) if kv is not None else frozenset()
    return digests, store.prefix.match([key_of(d) for d in digests], own)


@dataclass
class Session:
    session_id: str
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    turns: int = 0
    active: str = ""              # seq id of the turn running now ('' between turns)
    reused_tokens: int = 0        # prompt tokens its turns took from the cache

    @property
    def holder(self) -> str:
        return holder_id(self.session_id)


class SessionsMixin:
    # -- reuse at admission ---------------------------------------------------------------
    def _admit_fresh(self, s: Sequence) -> bool:
        """Add ``s``'s KV: blocks of its prompt prefix shared from the index, room
        reserved for the rest plus one block to grow into. False (nothing changed) when
        the GPU tier has no room for it now."""
        store, T, sid = self.store, self.store.block_size, s.seq_id
        ids = s.context_ids
        digests: list[bytes] = []
        entries = []
        sess = self.sessions.get(s.request.session_id or "")
        if self.config.prefix_caching:
            digests, entries = match_prompt(store, ids, self.config.observe_window,
                                            s.request.session_id)
        store.add_sequence(sid)
        if entries:
            store.share(sid, entries)
        room = self._admission_room(s, len(entries))
        # prompt tokens reserved now. With a fill format none: each chunk takes its room
        # when it is scheduled (Engine._schedule), and the room admission checked stays
        # counted as owed (_admission_room). Reserving the first chunk here held a
        # chunk at full precision for every prompt waiting its turn to prefill: at 32K on
        # an H100, 10 admitted int4 prompts held 7.5 GB of idle full-precision chunks
        # and pinned int4 ran 10 sequences at once where its bytes fit 15
        first = len(ids) if s.fill_format == FULL else 0
        if not store.make_room(GPU, room):
            store.free_sequence(sid)        # shared blocks go back as they were
            return False
        if sess is not None and sess.holder in self.idle:
            self._drop_idle(sess.holder)    # what this turn matched is its own now
        matched = self._settle_reused(s, len(entries))
        try:
            store.reserve(sid, max(0, first - matched * T))
        except OutOfBlocks:
            # the room was made for the match as found; settling it may cut it (blocks
            # on the host no staging can stream) or fetch blocks into that room. Found
            # by the prefix fuzz: the error escaped the step and left the sequence's
            # KV entry behind, so its next admission failed for good
            store.free_sequence(sid)
            return False
        s.num_prefilled = matched * T
        s.block_hashes = digests[:matched]
        if not s.num_preemptions:
            s.cached_tokens = matched * T
            store.prefix.queried_tokens += len(ids)
            store.prefix.hit_tokens += matched * T
        if sess is not None:
            sess.active, sess.last_used = sid, time.monotonic()
            sess.reused_tokens += matched * T
        return True

    def _admission_room(self, s: Sequence, shared: int = 0) -> dict[int, int]:
        """GPU-tier slots (slot bytes -> count) admitting ``s`` needs room for at once,
        ``shared`` of its prompt's blocks shared from the index: the rest plus one block
        to grow into at full precision; with a fill format those in it plus a prefill
        chunk's at full precision (written a chunk at a time, each converted once full).
        Also what the prompts admitted so before it still owe."""
        store = self.store
        room = self._prompt_slots(store.blocks_for(len(s.context_ids)) - shared + 1,
                                  s.fill_format)
        for other in self.running:
            okv = store.seqs.get(other.seq_id)
            if other.state == PREFILL and other.fill_format != FULL and okv is not None:
                owed = store.blocks_for(len(other.context_ids)) - len(okv.blocks)
                if owed > 0:
                    small = self.geom.slot_bytes(other.fill_format)
                    room[small] = room.get(small, 0) + owed
        return room

    def _settle_reused(self, s: Sequence, matched: int) -> int:
        """Offloaded blocks among the shared ones come back to the GPU tier where there
        is room (a returning session's parked KV); the rest stay on the host as long as
        one staging buffer streams them, else the match is cut before them. Returns the
        blocks kept."""
        store, sid = self.store, s.seq_id
        kv = store.seqs[sid]
        host = [b.index for b in kv.blocks[:matched] if b.tier == HOST]
        if host:
            try:
                moves.fetch(store, sid, host)
            except ActionError:     # no GPU room now: they stay on the host, streamed
                pass
        while staging_need(store, sid) > store.staging_half:
            matched = next(b.index for b in kv.blocks if b.tier == HOST)
            for b in kv.blocks[matched:]:
                store._release(b)
            del kv.blocks[matched:]
            kv.num_tokens = matched * store.block_size
        return matched

    # -- indexing -------------------------------------------------------------------------
    def _index_filled(self, seqs) -> None:
        """Index the blocks that filled in this step (hash chain continued)."""
        if not self.config.prefix_caching:
            return
        store, T = self.store, self.store.block_size
        for s in seqs:
            kv = store.seqs.get(s.seq_id)
            if kv is None:
                continue
            # a step launched ahead wrote a position whose token is not read yet
            full = min(kv.num_tokens, len(s.prompt_ids) + len(s.output_ids)) // T
            have = len(s.block_hashes)
            if full <= have:
                continue
            toks = s.prompt_ids + s.output_ids     # token at every KV position
            parent = s.block_hashes[-1] if have else None
            new = block_digests(toks, T, start=have, parent=parent, upto=full * T)
            s.block_hashes.extend(new)
            store.index_blocks(s.seq_id, have, [key_of(d) for d in new], toks,
                               None if parent is None else key_of(parent))

    # -- sessions -------------------------------------------------------------------------
    def _keep_session(self, s: Sequence, reason: str) -> bool:
        """At the end of a turn: keep its KV as the session's idle sequence. False when
        it has none to keep (not a session, never decoded, an error, sessions off)."""
        sess_id = s.request.session_id
        if s.seq_id in self._unkept:      # its session was dropped while it ran
            self._unkept.discard(s.seq_id)
            return False
        if not sess_id or reason == "error" or self.config.max_sessions == 0 \
                or s.seq_id not in self.store.seqs or s.swapped:
            self._session_done(sess_id, s.seq_id)
            return False
        sess = self.sessions.get(sess_id)
        if sess is None:
            sess = self.sessions[sess_id] = Session(sess_id)
        hid = sess.holder
        if hid in self.idle:               # a turn that did not reuse the last one's KV
            self._drop_idle(hid)
        kv = self.store.seqs.pop(s.seq_id)
        kv.seq_id = hid
        self.store.seqs[hid] = kv
        toks = (s.prompt_ids + s.output_ids)[:kv.num_tokens]
        idle = Sequence(hid, Request(prompt_ids=toks or [0], session_id=sess_id), toks,
                        _ignore, None, state=IDLE, admitted=True, num_prefilled=len(toks))
        idle.block_hashes = s.block_hashes
        self.idle[hid] = idle
        st = self.stats.pop(s.seq_id, None)
        if st is not None:
            self.stats[hid] = st
        sess.turns += 1
        sess.active = ""
        sess.last_used = time.monotonic()
        self._limit_sessions()
        return True

    def _session_done(self, sess_id: str | None, seq_id: str) -> None:
        sess = self.sessions.get(sess_id or "")
        if sess is not None and sess.active == seq_id:
            sess.active = ""
            if sess.holder not in self.idle:
                del self.sessions[sess_id]

    def _drop_idle(self, hid: str) -> None:
        self.idle.pop(hid, None)
        self.stats.pop(hid, None)
        self.store.free_sequence(hid, keep=False)   # blocks a running turn shares stay
        self._changed = True

    def drop_session(self, session_id: str) -> bool:
        """Forget a session: its idle KV freed (blocks a running sequence shares stay
        with it). False if there is no such session."""
        def run():
            sess = self.sessions.pop(session_id, None)
            if sess is None:
                return False
            if sess.holder in self.idle:
                self._drop_idle(sess.holder)
            if sess.active:            # a turn running now: its KV is not kept either
                self._unkept.add(sess.active)
            return True
        return self.call(run)

    def _drop_lru_idle(self, why: str) -> bool:
        """The engine's own last resort under memory pressure (the controller moves idle
        sessions first): forget the least recently used idle session."""
        idle = [x for x in self.sessions.values() if x.holder in self.idle]
        if not idle:
            return False
        sess = min(idle, key=lambda x: x.last_used)
        log.info("session %s dropped: %s", sess.session_id, why)
        self._drop_idle(sess.holder)
        del self.sessions[sess.session_id]
        self.num_sessions_dropped += 1
        return True

    def _limit_sessions(self) -> None:
        over = len(self.idle) - self.config.max_sessions
        if over <= 0:
            return
        idle = sorted((x for x in self.sessions.values() if x.holder in self.idle),
                      key=lambda x: x.last_used)
        for sess in idle[:over]:
            log.info("session %s dropped: more than %d idle sessions", sess.session_id,
                     self.config.max_sessions)
            self._drop_idle(sess.holder)
            del self.sessions[sess.session_id]

    def _expire_sessions(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self._expired_at < EXPIRY_EVERY_S:
            return
        self._expired_at = now
        ttl = self.config.session_ttl_s
        for sess in list(self.sessions.values()):
            if sess.holder in self.idle and now - sess.last_used > ttl:
                log.info("session %s expired after %.0f s idle", sess.session_id,
                         now - sess.last_used)
                self._drop_idle(sess.holder)
                del self.sessions[sess.session_id]

    def session_views(self) -> list[dict]:
        """Sessions now (engine thread: the snapshot carries them)."""
        now = time.monotonic()
        out = []
        for sess in self.sessions.values():
            by_tier: dict[str, int] = {}
            by_fmt: dict[str, int] = {}
            ntok = 0
            if sess.holder in self.store.seqs:
                by_tier, by_fmt = self.store.bytes_by(sess.holder)
                ntok = self.store.seqs[sess.holder].num_tokens
            out.append({"session_id": sess.session_id, "turns": sess.turns,
                        "seq_id": sess.holder if sess.holder in self.idle else "",
                        "idle_s": now - sess.last_used, "age_s": now - sess.created,
                        "active": sess.active, "num_tokens": ntok,
                        "reused_tokens": sess.reused_tokens,
                        "bytes_by_tier": by_tier, "bytes_by_format": by_fmt})
        return out


def _ignore(event) -> None:
    """An idle session's event sink: it is never scheduled."""
