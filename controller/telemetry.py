"""Node telemetry: NVML (GPU memory, PCIe throughput, utilization), psutil (host memory,
own RSS) and the engine snapshot, sampled on a timer into a ring buffer.

No GPU or no NVML library is CPU mode: a normal state with a reason a person can read,
never an exception out of this module.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import psutil

log = logging.getLogger("kvctl.telemetry")


@dataclass
class GpuSample:
    available: bool
    reason: str = ""
    name: str = ""
    memory_used_bytes: int = 0
    memory_total_bytes: int = 0
    utilization_pct: int = 0
    pcie_tx_bytes_per_s: int = 0
    pcie_rx_bytes_per_s: int = 0
    pcie_generation: int = 0
    pcie_width: int = 0


@dataclass
class HostSample:
    memory_total_bytes: int
    memory_available_bytes: int
    process_rss_bytes: int
    num_cpus: int


@dataclass
class Sample:
    time: float
    gpu: GpuSample
    host: HostSample
    snapshot: Any = None            # engine.actions.EngineSnapshot or None
    snapshot_error: str = ""


class Nvml:
    """One GPU through pynvml. ``available`` is False (with ``reason``) in CPU mode."""

    def __init__(self, index: int = 0) -> None:
        self.available = False
        self.reason = ""
        self._nv = None
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nv = pynvml
            self.available = True
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (cpu mode)"
        except Exception as e:  # pynvml.NVMLError_*: no driver, no library, no device
            self.reason = f"no NVIDIA GPU usable: {type(e).__name__}: {e} (cpu mode)"

    def sample(self) -> GpuSample:
        if not self.available:
            return GpuSample(available=False, reason=self.reason)
        nv, h = self._nv, self._handle
        s = GpuSample(available=True)
        # each query on its own: one unsupported field must not hide the others
        s.name = _try(lambda: _str(nv.nvmlDeviceGetName(h)), "")
        mem = _try(lambda: nv.nvmlDeviceGetMemoryInfo(h), None)
        if mem is not None:
            s.memory_used_bytes, s.memory_total_bytes = int(mem.used), int(mem.total)
        util = _try(lambda: nv.nvmlDeviceGetUtilizationRates(h), None)
        if util is not None:
            s.utilization_pct = int(util.gpu)
        # nvmlDeviceGetPcieThroughput reports KB/s over a 20 ms window
        s.pcie_tx_bytes_per_s = 1024 * _try(
            lambda: nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_TX_BYTES), 0)
        s.pcie_rx_bytes_per_s = 1024 * _try(
            lambda: nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_RX_BYTES), 0)
        s.pcie_generation = _try(lambda: nv.nvmlDeviceGetCurrPcieLinkGeneration(h), 0)
        s.pcie_width = _try(lambda: nv.nvmlDeviceGetCurrPcieLinkWidth(h), 0)
        if mem is None and util is None:
            # a GPU that answered at start and no longer does (fallen off the bus, driver
            # reset): say so; the figures are zeros, not last values
            try:
                nv.nvmlDeviceGetMemoryInfo(h)
            except Exception as e:
                s.reason = f"NVML stopped answering: {type(e).__name__}: {e}"
        return s

    def close(self) -> None:
        if self.available:
            _try(self._nv.nvmlShutdown, None)
            self.available = False


def _try(fn: Callable, default):
    try:
        return fn()
    except Exception:
        return default


def _str(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def host_sample(proc: psutil.Process | None = None) -> HostSample:
    vm = psutil.virtual_memory()
    proc = proc or psutil.Process(os.getpid())
    return HostSample(memory_total_bytes=int(vm.total), memory_available_bytes=int(vm.available),
                      process_rss_bytes=int(proc.memory_info().rss),
                      num_cpus=psutil.cpu_count() or 0)


class Telemetry:
    """Samples every ``interval_s`` on its own thread; ``latest`` never blocks on the
    engine. ``on_sample`` callbacks (controller tick, metrics) run on that thread."""

    def __init__(self, snapshot_fn: Callable[[], Any] | None = None, interval_s: float = 0.25,
                 history: int = 240, nvml: Nvml | None = None) -> None:
        self.snapshot_fn = snapshot_fn
        self.interval_s = interval_s
        self.nvml = nvml if nvml is not None else Nvml()
        self.ring: collections.deque[Sample] = collections.deque(maxlen=history)
        self.on_sample: list[Callable[[Sample], None]] = []
        self._proc = psutil.Process(os.getpid())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._latest: Sample | None = None

    @property
    def mode(self) -> str:
        return "gpu" if self.nvml.available else "cpu"

    def sample_now(self, callbacks: bool = True) -> Sample:
        """A sample now. With ``callbacks`` (the timer's samples) it joins the history and
        runs the ``on_sample`` callbacks (the policy tick among them); without (a client
        asking for fresh readings) it is only returned: reading never acts."""
        snap, err = None, ""
        if self.snapshot_fn is not None:
            try:
                snap = self.snapshot_fn()
            except Exception as e:
                err = f"{type(e).__name__}: {e}"
        s = Sample(time=time.time(), gpu=self.nvml.sample(), host=host_sample(self._proc),
                   snapshot=snap, snapshot_error=err)
        if not callbacks:
            return s
        self.ring.append(s)
        self._latest = s
        for cb in list(self.on_sample):
            try:
                cb(s)
            except Exception:
                log.exception("telemetry callback failed")
        return s

    def latest(self) -> Sample:
        s = self._latest
        return s if s is not None else self.sample_now()

    def start(self) -> None:
        self.sample_now()
        self._thread = threading.Thread(target=self._run, name="kvctl-telemetry", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample_now()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.nvml.close()
