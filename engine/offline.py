"""Driving sequences without the scheduler: for evaluations, trace recording and
orchestrators that feed tokens themselves.

A *held* sequence is prefilled without sampling and then extended by whatever tokens
the caller gives (teacher forcing), one decode step at a time (``append``, the paged
decode kernel: the same path as generation, with attention statistics) or a chunk at a
time (``extend``: causal attention over the stored prefix). It is never scheduled, yet
it is a sequence like any other: in snapshots (state 'held'), movable by the
controller's actions, freed by ``release``. Every call runs as the engine's writer (on
its thread between steps, or at once when no thread runs) through ``ModelRunner.run``.
"""
from __future__ import annotations

import copy

import torch

from engine.api import Request
from engine.arena import OutOfBlocks
from engine.runner import Chunk
from engine.sequence import HELD, Sequence
from engine.staging import staging_need
from engine.stats import SeqStats, update_batch


class OfflineMixin:
    def prefill(self, seq_id: str, token_ids: list[int], observe: bool = True,
                logits: str = "last") -> torch.Tensor:
        """A new held sequence holding ``token_ids``; returns the last position's logits
        [V] (``logits='all'``: [n, V]). ``observe``: record prompt-time scores."""
        ids = [int(t) for t in token_ids]
        self.check_prompt(len(ids))

        def run():
            with self._ids_lock:
                if seq_id in self._live:
                    raise ValueError(f"sequence id {seq_id!r} is already in use")
                self._live.add(seq_id)
            s = Sequence(seq_id, Request(prompt_ids=ids), ids, _ignore, None, state=HELD,
                         admitted=True, num_prefilled=len(ids))
            self.seqs[seq_id] = s
            self.held[seq_id] = s
            self.store.add_sequence(seq_id)
            self.stats[seq_id] = SeqStats(decay=self.config.stats_decay)
            try:
                return self._extend(seq_id, ids, logits, observe)
            except BaseException:
                self._drop_held(seq_id)
                raise
        out = self.call(run)
        return out[-1] if logits == "last" else out

    def extend(self, seq_id: str, token_ids: list[int], logits: str = "all",
               observe: bool = False) -> torch.Tensor:
        """Append a chunk of tokens to a held sequence; logits of its rows [n, V].
        ``observe``: record prompt-time scores over the last chunk (as a prefill does)."""
        ids = [int(t) for t in token_ids]
        return self.call(lambda: self._extend(seq_id, ids, logits, observe))

    def append(self, seq_ids: list[str], token_ids: list[int]) -> torch.Tensor:
        """One decode step of several held sequences together, sequence i reading token
        i; logits [n, V] in the order given."""
        if len(seq_ids) != len(token_ids):
            raise ValueError("append needs one token per sequence")
        return self.call(lambda: self._append(list(seq_ids), [int(t) for t in token_ids]))

    def fork(self, src_id: str, dst_id: str, share: bool = False) -> None:
        """A new held sequence with a copy of ``src_id``'s KV (every block in its format
        and tier) and statistics: several continuations of one prefill. ``share``: full
        blocks shared instead of copied (engine/store.py ``fork``)."""
        def run():
            self._held(src_id)
            with self._ids_lock:
                if dst_id in self._live:
                    raise ValueError(f"sequence id {dst_id!r} is already in use")
                self._live.add(dst_id)
            try:
                self.store.fork(src_id, dst_id, share)
            except BaseException:
                with self._ids_lock:
                    self._live.discard(dst_id)
                raise
            src = self.seqs[src_id]
            s = Sequence(dst_id, src.request, list(src.prompt_ids), _ignore, None,
                         state=HELD, admitted=True, num_prefilled=src.num_prefilled,
                         fill_format=src.fill_format)
            self.seqs[dst_id] = s
            self.held[dst_id] = s
            self.stats[dst_id] = copy.deepcopy(self.stats[src_id])
        self.call(run)

    def release(self, seq_id: str) -> None:
        """Free a held sequence's KV."""
        def run():
            self._held(seq_id)
            self._drop_held(seq_id)
        self.call(run)

    # -- writer side -----------------------------------------------------------------------
    def _held(self, seq_id: str) -> Sequence:
        s = self.held.get(seq_id)
        if s is None:
            raise KeyError(f"no held sequence {seq_id!r}")
        return s

    def _drop_held(self, seq_id: str) -> None:
        self.held.pop(seq_id, None)
        self.seqs.pop(seq_id, None)
        self.stats.pop(seq_id, None)
        self.store.free_sequence(seq_id)
        with self._ids_lock:
            self._live.discard(seq_id)
        self._changed = True

    def _extend(self, seq_id: str, ids: list[int], logits: str, observe: bool):
        self._held(seq_id)
        if not ids:
            raise ValueError("no tokens to append")
        step = self.config.max_batch_tokens
        outs = []
        for i in range(0, len(ids), step):
            toks = ids[i:i + step]
            last = i + step >= len(ids)
            want = logits if logits == "all" or (last and logits == "last") else "none"
            win = self.config.observe_window if observe and last else 0
            self.store.reserve(seq_id, len(toks))
            out = self._guarded([seq_id], lambda: self.runner.run(
                [], [Chunk(seq_id, toks, win, want)]))
            self._after(out.plan)
            if want != "none":
                outs.append(out.logits)
        self._changed = True
        return torch.cat(outs) if outs else torch.empty(0)

    def _append(self, seq_ids: list[str], toks: list[int]) -> torch.Tensor:
        for sid in seq_ids:
            self._held(sid)
        if sum(staging_need(self.store, sid) for sid in seq_ids) > self.store.staging_half:
            raise OutOfBlocks("these sequences' offloaded blocks exceed one staging buffer; "
                              "append them in smaller groups")
        for sid in seq_ids:
            self.store.reserve(sid, 1)
        out = self._guarded(seq_ids, lambda: self.runner.run(list(zip(seq_ids, toks)), []))
        self._after(out.plan)
        self._changed = True
        return out.logits

    def _apply_deferred_stats(self) -> None:
        """Fold in the last step's deferred block shares (``_after``): into the statistics
        objects of the sequences that were in it (one that ended since updates nothing
        anyone reads)."""
        d, self._deferred_stats = self._deferred_stats, None
        if d is not None:
            stats, host, ns, done = d
            done.synchronize()
            update_batch(stats, host, ns)

    def _guarded(self, seq_ids: list[str], fn):
        """``fn()`` (a model run); if it raises, the lengths it advanced roll back."""
        lengths = {sid: self.store.seqs[sid].num_tokens for sid in seq_ids}
        try:
            return fn()
        except BaseException:
            for sid, n in lengths.items():
                self.store.truncate(sid, n)
            raise

    def _after(self, plan, defer: bool = False, rows: list[int] | None = None) -> None:
        """The step's attention statistics. ``defer`` (CUDA): the block shares start
        copying to pinned host memory now and are folded in by ``_apply_deferred_stats``
        while the next step's forward runs, so that Python work overlaps the GPU instead
        of following it (one step late; the policy ticks every 0.25 s). ``rows``: the
        decode rows whose sequences still run (default: all)."""
        shares = plan.block_shares()
        if shares is not None:
            sids = plan.decode.seq_ids
            if rows is not None:
                sids = [sids[i] for i in rows]
                shares = shares[rows]
            stats = [self.stats[sid] for sid in sids]
            ns = [len(self.store.seqs[sid].blocks) for sid in sids]
            if defer and shares.is_cuda:   # the engine step applied the last one already
                host = torch.empty(shares.shape, dtype=shares.dtype, pin_memory=True)
                host.copy_(shares, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                self._deferred_stats = (stats, host, ns, done)
            else:
                update_batch(stats, shares.cpu(), ns)
        for sid, scores in plan.observed.items():
            self.stats[sid].observe(scores.cpu(), plan.accumulated[sid].cpu(),
                                    plan.distinct[sid].cpu())


def _ignore(event) -> None:
    """A held sequence's event sink: it is never scheduled, so it streams nothing."""
