"""The heuristic predictor: what a candidate move would cost, from the sequence's own
attention statistics and the accuracy measured per format on the default model.

Accuracy cost is in "perplexity fraction" units (0.01 = +1% PPL-equivalent):
* quantization: the measured PPL increase of the format (fp8 included) scaled by how much of the
  sequence's attention the touched blocks carry (plus their share of blocks, since
  attention moves): controller/predictors/costs.py;
* eviction: the attention mass removed, which is gone for good, plus a price per share
  of blocks for what query-agnostic eviction loses (costs.py);
* top-k offload: a fraction of the offloaded blocks' mass (pages not picked in a step);
* exact offload: none; its price is latency: the bytes streamed per step over this
  node's bus (controller/predictors/bus.py; none on a CPU engine).

A candidate made of parts (a mixed-precision plan: some blocks int8, some int4, some
evicted) costs the sum of its parts.

A learned predictor (controller/predictors/learned.py, trained from engine traces)
replaces this where an artifact for the loaded model exists; this one always exists.
"""
from __future__ import annotations

from dataclasses import dataclass

from controller.predictors.bus import FALLBACK_BYTES_PER_S, Bus
from controller.predictors.costs import evict_cost, quantize_cost
from controller.strategies import Candidate
from engine.actions import KVFormat, Quantize, SequenceView

# a GPU's PCIe when nothing says which node this is (traces, unit use)
ASSUMED_BUS = Bus(FALLBACK_BYTES_PER_S, 0.0, "assumed 55.3 GB/s (H200)")


@dataclass(frozen=True)
class Prediction:
    accuracy: float                  # PPL-fraction equivalent (learned: mean KL, nats)
    latency_s: float                 # added seconds per decode step
    source: str = "heuristic"        # which predictor priced the accuracy

    def total(self, latency_weight: float) -> float:
        return self.accuracy + latency_weight * self.latency_s


class HeuristicPredictor:
    name = "heuristic"

    def __init__(self, reason: str = "") -> None:
        self.reason = reason          # why no learned predictor prices moves (kvctl status)
        self.num_priced = 0

    def predict_many(self, items: list[tuple[SequenceView, Candidate]],
                     bus: Bus | None = None) -> list[Prediction]:
        self.num_priced += len(items)
        return [self.predict(s, c, bus) for s, c in items]

    def info(self) -> tuple[str, str, int, int]:
        """(kind, detail, moves priced, fallbacks) for `kvctl status`."""
        return self.name, self.reason, self.num_priced, 0

    def predict(self, seq: SequenceView, cand: Candidate, bus: Bus | None = None) -> Prediction:
        """``bus``: the node's (Bus.of); None prices offload as on an H200's PCIe."""
        if cand.parts:
            ps = [self.predict(seq, p, bus) for p in cand.parts]
            return Prediction(sum(p.accuracy for p in ps), sum(p.latency_s for p in ps))
        ids = set(cand.blocks)
        touched = [b for b in seq.blocks if b.index in ids]
        attended = [b for b in seq.blocks if b.tier in ("gpu", "host")] or seq.blocks
        total_mass = sum(b.mass for b in attended) or 1.0
        total_obs = sum(b.observed for b in attended) or 1.0
        mass = sum(b.mass for b in touched) / total_mass
        share = len(touched) / max(1, len(attended))
        # importance: a block's decayed attention share, its share of the prompt's last
        # queries (SnapKV) or its share of key distinctness (KeyDiff), the largest
        weight = sum(max(b.mass / total_mass, b.observed / total_obs, b.distinct)
                     for b in touched)
        if cand.kind == "quantize":
            q = next((a for a in cand.actions if isinstance(a, Quantize)), None)
            fmt = (KVFormat(q.bits, q.bits if q.v_bits is None else q.v_bits).name if q
                   else KVFormat.parse(cand.strategy.removeprefix("quantize_")).name)
            return Prediction(quantize_cost(fmt, weight, share), 0.0)
        if cand.kind == "evict":
            return Prediction(evict_cost(weight, share), 0.0)
        streamed = sum(b.nbytes for b in touched)
        bus = bus if bus is not None else ASSUMED_BUS
        if cand.strategy == "offload_topk":
            # a sequence that starts decoding over top-k pages adds a top-k row to every
            # step (measured: Bus.topk_row_s); one that already does adds its bytes
            new_row = not (seq.decode_mode == "topk" and seq.bytes_by_tier.get("host"))
            return Prediction(0.3 * mass, bus.seconds(streamed) * 0.125
                              + (bus.topk_row_s if new_row else 0.0))
        # exact: every block streamed each step, and the batch's steps run eager
        return Prediction(0.0, bus.seconds(streamed) + bus.graph_loss_s)
