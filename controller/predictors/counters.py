"""Process-wide predictor counters (torch-free: the metrics endpoint reads them)."""
from __future__ import annotations

import threading


class Counter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._n = 0

    def inc(self, n: int = 1) -> None:
        with self._lock:
            self._n += n

    @property
    def value(self) -> int:
        with self._lock:
            return self._n


# predictions the learned predictor handed to the heuristic (no usable artifact, a
# strategy it was not trained on, features outside the trained range)
FALLBACKS = Counter()
