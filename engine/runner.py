"""The model runner: the one way to run a step's work through the model.

The scheduler decides what runs (engine/engine.py); the runner turns it into logits: it
builds the step's plan (engine/plan.py: rows, write slots, block tables), runs the
model with kvctl's attention (engine/attention.py) and hands back the plan, whose
per-block partials and prompt-time scores feed the attention statistics. The engine's
step, its offline ``prefill``/``append`` and every benchmark go through ``run``; the
store must already have room for the tokens (``KVStore.reserve``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine import attention
from engine.plan import StepPlan, build_plan
from engine.store import KVStore

log = logging.getLogger("kvctl.engine.runner")


def is_oom(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or \
        "out of memory" in str(err).lower()


@dataclass
class Chunk:
    """Tokens of one sequence written in a step with causal attention over its KV."""

    seq_id: str
    token_ids: list[int]
    observe: int = 0            # SnapKV window: score the last ``observe`` queries
    logits: str = "last"        # 'last' | 'all' | 'none': which rows come back


@dataclass
class StepOutput:
    plan: StepPlan
    logits: torch.Tensor        # [R, V]: decode rows in order, then chunk rows asked for


class ModelRunner:
    def __init__(self, model: torch.nn.Module, store: KVStore, num_layers: int,
                 device: torch.device, cuda_graphs: bool = False, max_batch: int = 256,
                 compile_decode: bool = False, capture_tokens: int = 0) -> None:
        self.model = model
        self.store = store
        self.num_layers = num_layers
        self.device = device
        # decode-only steps through torch.compile (attention.compile_model); prefill
        # chunks vary in shape and stay eager
        self.compiled = attention.compile_model(model) if compile_decode else None
        self.graphs = None
        if cuda_graphs and device.type == "cuda":
            from engine.cuda_graphs import DecodeGraphs
            self.graphs = DecodeGraphs(model, store, num_layers, device, max_batch,
                                       compiled=self.compiled)
            self.graphs.capture_at_start(capture_tokens)

    def run(self, decode: list[tuple[str, int]], chunks: list[Chunk]) -> StepOutput:
        """One packed forward pass: ``decode`` (sequence, token) pairs attend over their
        block tables, ``chunks`` over their stored prefix plus themselves. On CUDA a
        decode-only step replays a captured graph where one covers it."""
        if self.graphs is not None and decode and not chunks:
            key = self.graphs.key(decode)
            if isinstance(key, tuple):
                out = self.graphs.run(key, decode)
                if out is not None:
                    return StepOutput(*out)
                key = self.graphs.failed[key]        # why not: the capture failed
            self.graphs.note_eager(key)
        plan = build_plan(self.store, decode, [(c.seq_id, c.token_ids, c.observe)
                                               for c in chunks],
                          self.num_layers, self.device)
        rows = list(range(plan.num_decode))     # decode rows come first
        for seg, c in zip(plan.prefills, chunks):
            if c.logits == "all":
                rows.extend(range(seg.start, seg.start + seg.length))
            elif c.logits == "last":
                rows.append(seg.start + seg.length - 1)
        compiled = self.compiled if decode and not chunks else None
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
        try:
            logits = attention.forward(self.model, plan.input_ids, plan.position_ids, plan,
                                       rows_t, compiled)
        except Exception as err:
            if compiled is None or is_oom(err):
                raise
            # torch.compile failed on a shape or an op: decode without it from now on
            # (graphs capture the plain model); this step again on the same plan (its
            # slots are the step's: building another would advance the lengths twice),
            # its per-forward state cleared as a graph replay clears it
            log.exception("the compiled decode step failed; decoding without compile")
            self.drop_compiled()
            plan.reset_forward()
            logits = attention.forward(self.model, plan.input_ids, plan.position_ids, plan,
                                       rows_t, None)
        return StepOutput(plan, logits)

    def drop_compiled(self) -> None:
        """Stop using torch.compile: eager steps and later graph captures run the plain
        model; keys whose compiled capture failed may be captured again."""
        self.compiled = None
        if self.graphs is not None:
            self.graphs.compiled = None
            self.graphs.failed.clear()
