"""NVML on a real GPU (skipped without one): the numbers `kvctl status` shows follow what
the GPU does."""
from __future__ import annotations

import threading
import time

import pytest

from controller.telemetry import Nvml, Telemetry

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GIB = 1 << 30


@pytest.fixture
def nvml():
    torch.cuda.init()
    torch.zeros(1, device="cuda")            # the CUDA context exists before the baseline
    torch.cuda.synchronize()
    n = Nvml()
    assert n.available, n.reason
    yield n
    n.close()


def test_gpu_identity_and_memory_follow_allocations(nvml):
    s0 = nvml.sample()
    free, total = torch.cuda.mem_get_info()
    assert s0.available and s0.name and s0.pcie_generation > 0 and s0.pcie_width > 0
    assert abs(s0.memory_total_bytes - total) <= 0.02 * total
    x = torch.empty(2 * GIB, dtype=torch.uint8, device="cuda")
    x.fill_(1)
    torch.cuda.synchronize()
    s1 = nvml.sample()
    grew = s1.memory_used_bytes - s0.memory_used_bytes
    assert 1.9 * GIB <= grew <= 2.6 * GIB, grew / GIB
    del x
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    s2 = nvml.sample()
    assert s2.memory_used_bytes - s0.memory_used_bytes < 0.3 * GIB


def test_pcie_throughput_sees_host_copies(nvml):
    """While pinned host memory streams to the GPU and back, NVML's PCIe counters
    (20 ms windows) report GB/s, not zero; the telemetry thread carries them."""
    nv, h = nvml._nv, nvml._handle
    try:
        nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_RX_BYTES)
    except Exception as e:  # a driver/VM that does not expose it: the sampler reports 0
        pytest.skip(f"PCIe throughput not exposed by this driver: {e}")
    host = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    stop = threading.Event()

    def pump():
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            while not stop.is_set():
                dev.copy_(host, non_blocking=True)
                host.copy_(dev, non_blocking=True)
                s.synchronize()

    t = threading.Thread(target=pump)
    tel = Telemetry(None, interval_s=0.05, history=64, nvml=nvml)
    t.start()
    try:
        time.sleep(0.2)
        for _ in range(20):
            tel.sample_now()
            time.sleep(0.05)
    finally:
        stop.set()
        t.join()
    rx = max(s.gpu.pcie_rx_bytes_per_s for s in tel.ring)
    tx = max(s.gpu.pcie_tx_bytes_per_s for s in tel.ring)
    assert rx > 1e9 and tx > 1e9, (rx, tx)
