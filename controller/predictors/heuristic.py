"""The heuristic predictor: what a candidate move would cost, from the sequence's own
attention statistics and the accuracy measured per format on the default model.

Accuracy cost is in "perplexity fraction" units (0.01 = +1% PPL-equivalent):
* quantization: the measured PPL increase of the format (docs/BENCHMARKS.md, CPU,
  SmolLM2, the worse of 2K and 4K: int8 +0.02%, int4 +0.4%, k4v2 +3.6%, int2 +7.7%;
  fp8 +0.16% at 2K)
  scaled by how much of the sequence's attention the touched blocks carry (plus their
  share of blocks, since attention moves);
* eviction: the attention mass removed, which is gone for good;
* top-k offload: a fraction of the offloaded blocks' mass (pages not picked in a step);
* exact offload: none; its price is latency: the bytes streamed per step over this
  node's bus (controller/predictors/bus.py; none on a CPU engine).

A learned predictor (controller/predictors/learned.py, trained from engine traces)
replaces this where an artifact for the loaded model exists; this one always exists.
"""
from __future__ import annotations

from dataclasses import dataclass

from controller.predictors.bus import FALLBACK_BYTES_PER_S, Bus
from controller.strategies import Candidate
from engine.actions import SequenceView
from engine.actions import KVFormat

# measured PPL increase per format (fraction), docs/BENCHMARKS.md "KV quantization accuracy"
# a GPU's PCIe when nothing says which node this is (traces, unit use)
ASSUMED_BUS = Bus(FALLBACK_BYTES_PER_S, 0.0, "assumed 55.3 GB/s (H200)")
FORMAT_COST = {"int8": 0.0002, "fp8": 0.0016, "k8v4": 0.002, "int4": 0.004, "k4v2": 0.036,
               "int2": 0.077}


@dataclass(frozen=True)
class Prediction:
    accuracy: float                  # PPL-fraction equivalent (learned: mean KL, nats)
    latency_s: float                 # added seconds per decode step
    source: str = "heuristic"        # which predictor priced the accuracy

    def total(self, latency_weight: float) -> float:
        return self.accuracy + latency_weight * self.latency_s


class HeuristicPredictor:
    name = "heuristic"

    def predict_many(self, items: list[tuple[SequenceView, Candidate]],
                     bus: Bus | None = None) -> list[Prediction]:
        return [self.predict(s, c, bus) for s, c in items]

    def predict(self, seq: SequenceView, cand: Candidate, bus: Bus | None = None) -> Prediction:
        """``bus``: the node's (Bus.of); None prices offload as on an H200's PCIe."""
        touched = [b for b in seq.blocks if b.index in set(cand.blocks)]
        attended = [b for b in seq.blocks if b.tier in ("gpu", "host")] or seq.blocks
        total_mass = sum(b.mass for b in attended) or 1.0
        mass = sum(b.mass for b in touched) / total_mass
        share = len(touched) / max(1, len(attended))
        if cand.kind == "quantize":
            fmt = KVFormat.parse(cand.strategy.removeprefix("quantize_")).name
            return Prediction(FORMAT_COST.get(fmt, 0.25) * (mass + share) / 2, 0.0)
        if cand.kind == "evict":
            return Prediction(mass + 0.02 * share, 0.0)
        streamed = sum(b.nbytes for b in touched)
        bus = bus if bus is not None else ASSUMED_BUS
        if cand.strategy == "offload_topk":
            return Prediction(0.3 * mass, bus.seconds(streamed) * 0.125)
        return Prediction(0.0, bus.seconds(streamed))
