"""The learned predictor: accuracy cost from a scikit-learn model trained on engine
traces (controller/traces.py, `kvctl train`), latency from the heuristic's bus model.

Accuracy cost is the predicted mean KL(full || moved) of next-token distributions over
the following tokens (nats); for small changes that is close to the heuristic's
"PPL fraction" (the NLL increase under teacher forcing is a KL), so profiles' latency
weights keep their meaning. Whenever the model cannot answer — no usable artifact, a
strategy it never saw, features outside the range it was trained on — the heuristic
answers instead and ``counters.FALLBACKS`` counts it (kvctl_predictor_fallbacks_total).
A file may hold several members fitted on different traces (long sequences, short chat
requests); the first that holds a move in its ranges prices it (artifact.Artifact).
"""
from __future__ import annotations

import gc
import logging
import os
import re
import threading
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
        self._artifact = artifact
        self._reason = reason if artifact is None else ""
        self._loader: threading.Thread | None = None
        self.heuristic = HeuristicPredictor()
        self.num_fallbacks = 0

    @property
    def artifact(self) -> art.Artifact | None:
        """The model; waits for a background load (``in_background``) to end."""
        if self._loader is not None:
            self._loader.join()
        return self._artifact

    @property
    def reason(self) -> str:
        """Why there is no artifact ("" when there is one)."""
        return "" if self.artifact is not None else self._reason

    @classmethod
    def from_file(cls, path: str | Path, model_id: str | None = None) -> "LearnedPredictor":
        """A predictor from ``path``; when it cannot be used, one that always falls back
        (the reason is logged once and kept in ``reason``)."""
        p = cls(None)
        p._load(path, model_id)
        return p

    @classmethod
    def in_background(cls, path: str | Path, model_id: str | None = None) -> "LearnedPredictor":
        """``from_file`` on a thread: importing scikit-learn and skops and reading the
        file take ~1.8 s of a ~6 s daemon start on a 2-core box (README), and the
        daemon can serve meanwhile. The first use of ``artifact`` (the first priced
        move) waits for the load."""
        p = cls(None)
        p._loader = threading.Thread(target=p._load, args=(path, model_id, True),
                                     name="kvctl-predictor-load", daemon=True)
        p._loader.start()
        return p

    def _load(self, path: str | Path, model_id: str | None, background: bool = False) -> None:
        try:
            self._artifact = art.load(path, model_id)
            log.info("learned predictor for %r from %s", model_id, path)
        except art.ArtifactError as e:
            log.warning("learned predictor unusable, the heuristic decides: %s", e)
            self._reason = str(e)
        except Exception as e:   # on a thread: say so rather than end the thread silently
            if not background:
                raise
            log.exception("learned predictor failed to load, the heuristic decides")
            self._reason = f"{path}: failed to load ({type(e).__name__}: {e})"
        if background and gc.get_freeze_count():
            # the daemon froze its long-lived objects once started (controller/server.py:
            # full collections stall every thread); freeze the modules loaded here too
            gc.freeze()

    def _fallback(self, n: int = 1) -> None:
        self.num_fallbacks += n
        FALLBACKS.inc(n)

    def predict_many(self, items: list[tuple[SequenceView, Candidate]],
                     bus=None) -> list[Prediction]:
        out = self.heuristic.predict_many(items, bus)     # counts every move priced
        a = self.artifact
        if a is None:
            self._fallback(len(items))
            return out
        # a plan made of parts (controller/strategies/mixed_precision.py) is priced as a
        # whole where a member was trained on such plans and holds it in range, else as
        # the sum of its parts, each priced by the first member that holds it; the model
        # answers for the plan only if it answers for every part
        rows = []                     # (item, features, member or None)
        for i, (s, c) in enumerate(items):
            x = vector(candidate_features(s, c))
            m = a.member_for(c.strategy, x)
            if m is not None or not c.parts:
                rows.append((i, x, m))
                continue
            for p in c.parts:
                x = vector(candidate_features(s, p))
                rows.append((i, x, a.member_for(p.strategy, x)))
        ok = set(range(len(items))) - {i for i, _, m in rows if m is None}
        self._fallback(len(items) - len(ok))
        kl = dict.fromkeys(ok, 0.0)
        for k, member in enumerate(a.members):
            take = [(i, x) for i, x, m in rows if m == k and i in ok]
            if take:
                X = np.array([x for _, x in take], dtype=np.float64)
                for (i, _), v in zip(take, member.predict_kl(X)):
                    kl[i] += float(v)
        for i in ok:
            out[i] = Prediction(kl[i], out[i].latency_s, self.name)
        return out

    def predict(self, seq: SequenceView, cand: Candidate,
                bus=None) -> Prediction:
        return self.predict_many([(seq, cand)], bus)[0]

    def info(self) -> tuple[str, str, int, int]:
        """(kind, detail, moves priced, fallbacks) for `kvctl status`; never waits for
        the file to load."""
        priced = self.heuristic.num_priced
        if self._loader is not None and self._loader.is_alive():
            return self.name, "loading", priced, self.num_fallbacks
        a = self._artifact
        if a is None:
            return "heuristic", f"the predictor file is unusable: {self._reason}", \
                priced, self.num_fallbacks
        n = len(a.members)
        return self.name, f"{a.model_id}, {n} member{'s' if n != 1 else ''}", \
            priced, self.num_fallbacks


def predictor_for(model_id: str) -> HeuristicPredictor | LearnedPredictor:
    """The policy loop's predictor for the loaded model: the learned one when a predictor
    file for it exists ($KVCTL_PREDICTOR, else the one shipped in ``DATA_DIR``), else
    the heuristic. A file that exists but does not fit gives a learned predictor that
    falls back on every call (and counts it), so the mismatch shows in the metrics.
    The file loads on a thread (``LearnedPredictor.in_background``)."""
    env = os.environ.get(ENV_PATH, "").strip()
    if env == "heuristic":
        return HeuristicPredictor(f"{ENV_PATH}=heuristic")
    path = Path(env).expanduser() if env else artifact_path(model_id)
    if not path.exists():
        if env:
            log.warning("%s=%s does not exist; the heuristic predictor decides", ENV_PATH, env)
        else:
            log.info("no learned predictor for model %r; the heuristic predictor decides",
                     model_id)
        if env:
            return LearnedPredictor(None, f"{path} does not exist")
        return HeuristicPredictor(f"no predictor file for model {model_id!r}")
    return LearnedPredictor.in_background(path, model_id)
