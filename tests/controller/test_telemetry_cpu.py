import types

import pytest

from controller.telemetry import Nvml, Telemetry
from controller.server import sd_notify, watchdog_interval_s


def test_no_nvml_is_cpu_mode_not_a_crash():
    n = Nvml()
    if n.available:   # a machine with a GPU: tests/controller/test_telemetry_gpu.py
        pytest.skip("NVML finds a GPU here")
    assert "cpu mode" in n.reason
    s = n.sample()
    assert not s.available and s.memory_total_bytes == 0 and s.reason == n.reason


def test_ring_buffer_and_callbacks():
    calls = []
    t = Telemetry(lambda: {"step": len(calls)}, interval_s=0.01, history=3, nvml=Nvml())
    t.on_sample.append(lambda s: calls.append(s.snapshot))
    for _ in range(5):
        t.sample_now()
    assert len(t.ring) == 3 and [s.snapshot["step"] for s in t.ring] == [2, 3, 4]
    assert t.latest() is t.ring[-1] and t.mode == ("gpu" if t.nvml.available else "cpu")
    assert t.latest().host.memory_total_bytes > 0 and t.latest().host.process_rss_bytes > 0


def test_snapshot_failure_is_recorded_not_raised():
    def boom():
        raise RuntimeError("engine gone")

    t = Telemetry(boom, nvml=Nvml())
    s = t.sample_now()
    assert s.snapshot is None and "engine gone" in s.snapshot_error


class _FakeNvml:
    """pynvml's surface as the sampler uses it, with the PCIe query unsupported."""
    NVML_PCIE_UTIL_TX_BYTES, NVML_PCIE_UTIL_RX_BYTES = 0, 1

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H200"

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=10, total=100)

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=42)

    def nvmlDeviceGetPcieThroughput(self, h, which):
        if which == 1:
            raise RuntimeError("not supported")
        return 7

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h):
        return 5

    def nvmlDeviceGetCurrPcieLinkWidth(self, h):
        return 16


def test_gpu_sample_survives_an_unsupported_query():
    n = Nvml()
    n.available, n._nv, n._handle = True, _FakeNvml(), object()
    s = n.sample()
    assert (s.name, s.memory_used_bytes, s.memory_total_bytes, s.utilization_pct) == ("NVIDIA H200", 10, 100, 42)
    assert (s.pcie_tx_bytes_per_s, s.pcie_rx_bytes_per_s, s.pcie_generation, s.pcie_width) == (7 * 1024, 0, 5, 16)


def test_sd_notify(tmp_path, monkeypatch):
    import socket

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(tmp_path / "n"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n"))
    assert sd_notify("WATCHDOG=1")
    assert rx.recv(100) == b"WATCHDOG=1"
    rx.close()
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    abstract.bind("\0kvctl-test-notify")
    monkeypatch.setenv("NOTIFY_SOCKET", "@kvctl-test-notify")
    assert sd_notify("READY=1")
    assert abstract.recv(100) == b"READY=1"
    abstract.close()


def test_watchdog_interval(monkeypatch):
    import os

    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")          # meant for another process
    assert watchdog_interval_s() is None


class _LostNvml(_FakeNvml):
    """An NVML whose every device query fails, as after the GPU fell off the bus."""

    def __getattribute__(self, name):
        if name.startswith("nvmlDevice"):
            def lost(*a):
                raise RuntimeError("NVMLError_GpuIsLost: GPU is lost")
            return lost
        return object.__getattribute__(self, name)


def test_gpu_lost_mid_run_is_reported_and_the_daemon_keeps_sampling():
    """NVML answering at start, then failing every query: samples go on (zeros and a
    reason, never the last values), the snapshot and the callbacks still run."""
    n = Nvml()
    n.available, n._nv, n._handle = True, _FakeNvml(), object()
    assert n.sample().reason == ""
    n._nv = _LostNvml()
    seen = []
    t = Telemetry(lambda: "snap", nvml=n)
    t.on_sample.append(seen.append)
    s = t.sample_now()
    assert s.snapshot == "snap" and seen == [s]
    assert s.gpu.available and "GpuIsLost" in s.gpu.reason
    assert (s.gpu.memory_used_bytes, s.gpu.utilization_pct, s.gpu.pcie_rx_bytes_per_s) == (0, 0, 0)
