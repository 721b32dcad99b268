"""EngineHandle: the controller's only door into the engine (snapshot in, actions out)."""
from __future__ import annotations

import time

from engine import moves
from engine.actions import (Action, ActionError, ActionResult, BlockView, EngineSnapshot,
                            Evict, Fetch, Offload, Quantize, Restore, SequenceView,
                            SetDecodeMode, SetFillFormat, TierView)
from engine.layout import FULL, KVFormat
from engine.store import GPU


class EngineHandle:
    def __init__(self, engine):
        self._e = engine

    def estimate_bytes(self, num_tokens: int, fmt: str = "full") -> int:
        return self._e.store.estimate_bytes(num_tokens, KVFormat.parse(fmt))

    # -- snapshot -------------------------------------------------------------------------
    def snapshot(self) -> EngineSnapshot:
        e = self._e
        with e.lock:
            st = e.store
            tiers = {name: TierView(name, str(a.device), a.capacity_bytes, a.used_bytes,
                                    a.block_bytes, a.capacity_bytes - a.used_bytes)
                     for name, a in st.arenas.items()}
            seqs = []
            pressure = 0
            for s in list(e.waiting) + e.running:
                if s.stalled:
                    pressure += st.block_bytes(FULL)
                seqs.append(self._view(s.seq_id, "stalled" if s.stalled else s.state,
                                       len(s.prompt_ids), len(s.output_ids), s.priority,
                                       s.request.strategy))
            if e.waiting:
                s = max(e.waiting, key=lambda x: (x.priority, -x.arrival))
                need = st.estimate_bytes(len(s.prompt_ids)) + st.block_bytes(FULL)
                pressure += max(0, need - (tiers[GPU].free_bytes))
            return EngineSnapshot(time.time(), e.step_count, str(e.device), e.model_name,
                                  st.block_size, e.num_layers, tiers, seqs, len(e.waiting),
                                  len(e.running), sum(s.stalled for s in e.running),
                                  pressure, e.tokens_per_s(),
                                  {f: st.block_bytes(KVFormat.parse(f)) for f in
                                   ("full", "int8", "int4", "int2", "k4v2", "k8v4")},
                                  st.num_sink_blocks)

    def sequence_view(self, seq_id: str, num_prompt_tokens: int = 0) -> SequenceView:
        """View of a sequence the store holds, also one driven below the scheduler
        (benchmarks' teacher-forced runs)."""
        with self._e.lock:
            if seq_id not in self._e.store.seqs:
                raise KeyError(seq_id)
            return self._view(seq_id, "decode", num_prompt_tokens, 0, 0, None)

    def _view(self, seq_id, state, num_prompt, num_generated, priority, pin) -> SequenceView:
        st = self._e.store
        kv = st.seqs.get(seq_id)
        stats = self._e.stats.get(seq_id)
        blocks = []
        by_tier, by_fmt = {}, {}
        if kv is not None:
            mass = stats.mass.tolist() if stats is not None else []
            obs = stats.observed.tolist() if stats is not None else []
            for b in kv.blocks:
                blocks.append(BlockView(
                    b.index, b.num_tokens, b.fmt.name, b.tier,
                    st.block_bytes(b.fmt) if b.offset >= 0 else 0,
                    mass[b.index] if b.index < len(mass) else 0.0,
                    obs[b.index] if b.index < len(obs) else 0.0))
            by_tier, by_fmt = st.bytes_by(seq_id)
        return SequenceView(
            seq_id, state, num_prompt, kv.num_tokens if kv else 0, num_generated, priority,
            kv.decode_mode if kv else "exact", kv.top_k if kv else 0, by_tier, by_fmt,
            blocks, stats.entropy if stats else 0.0, stats.sink_mass if stats else 0.0,
            stats.recent_mass if stats else 0.0, pin)

    # -- actions --------------------------------------------------------------------------
    def apply(self, action: Action) -> ActionResult:
        """Validate and apply one action between steps; raises ActionError if illegal."""
        e = self._e
        t0 = time.perf_counter()
        with e.lock:
            if isinstance(action, Quantize):
                fmt = moves.check_format(action.bits, action.v_bits)
                freed = moves.quantize(e.store, action.seq_id, action.blocks, fmt)
                self._note(action.seq_id, f"quantize {len(action.blocks)} blocks -> {fmt.name}")
                res = ActionResult(action, True, {GPU: freed})
            elif isinstance(action, SetFillFormat):
                kv = e.store.seqs.get(action.seq_id)
                if kv is None:
                    raise ActionError(f"unknown sequence {action.seq_id!r}")
                fmt = FULL if action.bits == 0 and not action.v_bits else \
                    moves.check_format(action.bits, action.v_bits)
                kv.fill_format = fmt
                self._note(action.seq_id, f"fill format -> {fmt.name}")
                res = ActionResult(action, True, {})
            elif isinstance(action, Evict):
                freed = moves.evict(e.store, action.seq_id, action.blocks, action.park)
                self._note(action.seq_id, f"{'park' if action.park else 'evict'} "
                                          f"{len(action.blocks)} blocks")
                res = ActionResult(action, True, freed)
            elif isinstance(action, Restore):
                freed = moves.restore(e.store, action.seq_id, action.blocks)
                self._note(action.seq_id, f"restore {len(action.blocks)} blocks")
                res = ActionResult(action, True, freed)
            elif isinstance(action, Offload):
                freed = moves.offload(e.store, action.seq_id, action.blocks)
                self._note(action.seq_id, f"offload {len(action.blocks)} blocks")
                res = ActionResult(action, True, freed)
            elif isinstance(action, Fetch):
                freed = moves.fetch(e.store, action.seq_id, action.blocks)
                self._note(action.seq_id, f"fetch {len(action.blocks)} blocks")
                res = ActionResult(action, True, freed)
            elif isinstance(action, SetDecodeMode):
                moves.set_decode_mode(e.store, action.seq_id, action.mode, action.top_k)
                self._note(action.seq_id, f"decode mode -> {action.mode}"
                                          + (f" (k={action.top_k})" if action.mode == "topk" else ""))
                res = ActionResult(action, True, {})
            else:
                raise ActionError(f"unknown action {action!r}")
        res.seconds = time.perf_counter() - t0
        return res

    def _note(self, seq_id: str, what: str) -> None:
        s = self._e.seqs.get(seq_id)
        if s is not None:
            s.moves.append(what)
