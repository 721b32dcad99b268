"""Accuracy- and latency-cost predictors for candidate moves.

Names load lazily (PEP 562): ``controller.predictors.counters`` stays importable
without torch (the metrics endpoint reads it)."""
from __future__ import annotations

import importlib

_WHERE = {"HeuristicPredictor": "heuristic", "Prediction": "heuristic",
          "LearnedPredictor": "learned", "predictor_for": "learned"}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"controller.predictors.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'controller.predictors' has no attribute {name!r}")
