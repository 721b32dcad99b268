"""The learned predictor: accuracy cost from a scikit-learn model trained on engine
traces (controller/traces.py, `kvctl train`), latency from the heuristic's bus model.

Accuracy cost is the predicted mean KL(full || moved) of next-token distributions over
the following tokens (nats); for small changes that is close to the heuristic's
"PPL fraction" (the NLL increase under teacher forcing is a KL), so profiles' latency
weights keep their meaning. Whenever the model cannot answer — no usable artifact, a
strategy it never saw, features outside the range it was trained on — the heuristic
answers instead and ``counters.FALLBACKS`` counts it (kvctl_predictor_fallbacks_total).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from controller.predictors import artifact as art
from controller.predictors.counters import FALLBACKS
from controller.predictors.features import candidate_features, vector
from controller.predictors.heuristic import HeuristicPredictor, Prediction
from controller.strategies import Candidate
from engine.actions import SequenceView

log = logging.getLogger("kvctl.controller.predictor")

DATA_DIR = Path(__file__).resolve().parent / "data"
ENV_PATH = "KVCTL_PREDICTOR"        # a predictor file to use instead of the shipped one


def artifact_path(model_id: str) -> Path:
    """Where the shipped artifact for ``model_id`` lives (it may not exist)."""
    return DATA_DIR / (re.sub(r"[^a-z0-9]+", "-", model_id.lower()).strip("-") + ".skops")


class LearnedPredictor:
    name = "learned"

    def __init__(self, artifact: art.Artifact | None, reason: str = "") -> None:
        self.artifact = artifact
        self.heuristic = HeuristicPredictor()
        self.reason = reason if artifact is None else ""
        self.num_fallbacks = 0

    @classmethod
    def from_file(cls, path: str | Path, model_id: str | None = None) -> "LearnedPredictor":
        """A predictor from ``path``; when it cannot be used, one that always falls back
        (the reason is logged once and kept in ``reason``)."""
        try:
            return cls(art.load(path, model_id))
        except art.ArtifactError as e:
            log.warning("learned predictor unusable, the heuristic decides: %s", e)
            return cls(None, str(e))

    def _fallback(self, n: int = 1) -> None:
        self.num_fallbacks += n
        FALLBACKS.inc(n)

    def predict_many(self, items: list[tuple[SequenceView, Candidate]],
                     bus_busy_fraction: float = 0.0) -> list[Prediction]:
        out = self.heuristic.predict_many(items, bus_busy_fraction)
        a = self.artifact
        if a is None:
            self._fallback(len(items))
            return out
        X = np.array([vector(candidate_features(s, c)) for s, c in items], dtype=np.float64)
        ok = [i for i, (_, c) in enumerate(items)
              if c.strategy in a.strategies and a.in_range(X[i])]
        self._fallback(len(items) - len(ok))
        if ok:
            for i, kl in zip(ok, a.predict_kl(X[ok])):
                out[i] = Prediction(float(kl), out[i].latency_s, self.name)
        return out

    def predict(self, seq: SequenceView, cand: Candidate,
                bus_busy_fraction: float = 0.0) -> Prediction:
        return self.predict_many([(seq, cand)], bus_busy_fraction)[0]


def predictor_for(model_id: str) -> HeuristicPredictor | LearnedPredictor:
    """The policy loop's predictor for the loaded model: the learned one when a predictor
    file for it exists ($KVCTL_PREDICTOR, else the one shipped in ``DATA_DIR``), else
    the heuristic. A file that exists but does not fit gives a learned predictor that
    falls back on every call (and counts it), so the mismatch shows in the metrics."""
    env = os.environ.get(ENV_PATH, "").strip()
    if env == "heuristic":
        return HeuristicPredictor()
    path = Path(env).expanduser() if env else artifact_path(model_id)
    if not path.exists():
        if env:
            log.warning("%s=%s does not exist; the heuristic predictor decides", ENV_PATH, env)
        else:
            log.info("no learned predictor for model %r; the heuristic predictor decides",
                     model_id)
        if env:
            return LearnedPredictor(None, f"{path} does not exist")
        return HeuristicPredictor()
    p = LearnedPredictor.from_file(path, model_id)
    if p.artifact is not None:
        log.info("learned predictor for %r from %s", model_id, path)
    return p
