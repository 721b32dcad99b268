"""Accuracy- and latency-cost predictors for candidate moves."""
from controller.predictors.heuristic import HeuristicPredictor, Prediction

__all__ = ["HeuristicPredictor", "Prediction"]
