"""What streaming offloaded blocks costs on this node: the bus between host and device
memory, read from telemetry, never a constant for every machine.

* The engine on a GPU: PCIe at the link's generation and width as NVML reports them,
  at the share of the link a pinned host-to-device copy reaches (55.3 of 63.0 GB/s on
  the H200's Gen5 x16, FACTS.md), less what other traffic takes now (NVML's RX rate).
* The engine on the CPU: no bus. Its host tier is another arena in the same memory, so
  offload costs a memory copy per step, not a transfer; priced at zero and labelled so.

And what streaming costs besides the bytes: a decode step with a block streamed exactly
runs eager (its copies are not in any CUDA graph), and so does every sequence batched
with it. ``graph_loss_s`` is that added step time, from the engine's own step times
(``EngineSnapshot.graphs``: eager against replayed decode steps), 0 where no graphs run.
Priced by bytes alone, 27 running sequences on an H100 took 490 exact offloads and every
step ran eager (docs/BENCHMARKS.md).
"""
from __future__ import annotations

from dataclasses import dataclass

# GB/s per lane and direction, after line coding (PCI-SIG)
PCIE_LANE_GBPS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
COPY_EFFICIENCY = 0.878          # pinned H2D copies of >= 16 MiB: 55.3 of 63.0 GB/s (H200)
FALLBACK_BYTES_PER_S = 55.3e9    # a GPU whose link NVML cannot read: the H200's measurement
# before any eager decode step was timed: eager steps took 4.8-5.6x a graph replay at
# batch 1 / 8 / 32 on an H100 (docs/BENCHMARKS.md, issue 13's table); 4x, the low side
EAGER_OVER_REPLAY = 4.0
# a replayed decode step before the engine timed one: an 8B model at batch 8 and 32K on
# an H100 replays in 20 ms (docs/BENCHMARKS.md); only until its first decode-only step
PRIOR_REPLAY_S = 0.020
# a top-k row's added step time before the engine timed a step with one, per replayed
# step: on the headline's H100 runs steps with 14-15 top-k rows took 95 / 133 ms against
# 11.9 / 11.4 ms replayed, 0.49 / 0.69 of a replay per row (docs/BENCHMARKS.md); the low side
TOPK_ROW_OVER_REPLAY = 0.5


@dataclass(frozen=True)
class Bus:
    bytes_per_s: float | None    # None: no bus (CPU engine)
    busy_fraction: float = 0.0   # of the link, used by other traffic now
    source: str = ""             # where the figure comes from (for decisions and status)
    graph_loss_s: float = 0.0    # added step time when a step must run eager (see above)
    topk_row_s: float = 0.0      # added step time per sequence decoding top-k pages
    step_s: float = PRIOR_REPLAY_S  # a decode step's time now (replayed; before one ran,
                                 # the prior): what a paused sequence's share is priced from

    @classmethod
    def none(cls) -> "Bus":
        return cls(None, 0.0, "cpu engine: no bus, offload is a host memory copy")

    @classmethod
    def of(cls, snapshot, gpu=None) -> "Bus":
        """The bus for an engine snapshot and a telemetry GpuSample (or None)."""
        device = getattr(snapshot, "device", "cpu") if snapshot is not None else "cpu"
        if not str(device).startswith("cuda"):
            return cls.none()
        loss, row = graph_loss_s(snapshot), topk_row_s(snapshot)
        step = (getattr(snapshot, "graphs", None) or {}).get("replay_step_s") or PRIOR_REPLAY_S
        if gpu is not None and getattr(gpu, "available", False) and gpu.pcie_width \
                and gpu.pcie_generation in PCIE_LANE_GBPS:
            peak = PCIE_LANE_GBPS[gpu.pcie_generation] * gpu.pcie_width * 1e9
            bw = peak * COPY_EFFICIENCY
            busy = min(0.95, max(0.0, gpu.pcie_rx_bytes_per_s / peak))
            return cls(bw, busy, f"PCIe Gen{gpu.pcie_generation} x{gpu.pcie_width} (NVML)",
                       loss, row, step)
        return cls(FALLBACK_BYTES_PER_S, 0.0, "PCIe not readable: assumed 55.3 GB/s", loss,
                   row, step)

    def seconds(self, nbytes: int) -> float:
        """Added time per decode step to stream ``nbytes`` over this bus."""
        if self.bytes_per_s is None:
            return 0.0
        return nbytes / (self.bytes_per_s * max(0.05, 1.0 - self.busy_fraction))


def topk_row_s(snapshot) -> float:
    """Added seconds a decode step takes per sequence decoding over top-k pages (its
    picks, the gather of the picked blocks from host memory, and a capture or eager
    steps each time the set of top-k rows changes), from the engine's own step times:
    decode-only steps with top-k rows against replayed ones without, per top-k row.
    0 until both were timed, and without graphs (the CPU: priced by bytes, as before).
    The bytes alone priced a top-k offload at a few ms: on the headline's H100 run the
    steps of a batch with top-k rows took 80 ms against 34 without (docs/BENCHMARKS.md).

    Before a step with top-k rows was timed: ``TOPK_ROW_OVER_REPLAY`` of a replayed step
    (``PRIOR_REPLAY_S`` before one was timed). Priced 0 then, the first relief after the
    headline's queue drained put 21 sequences on top-k pages at once (eleventh session,
    H100): 95-133 ms steps against 12 replayed, and 0.5x of pinned int4's throughput."""
    g = getattr(snapshot, "graphs", None) or {}
    if "num_replays" not in g:               # this engine runs no graphs
        return 0.0
    topk, rows, replay = (g.get("topk_step_s", 0.0), g.get("topk_rows", 0.0),
                          g.get("replay_step_s", 0.0))
    if topk <= 0.0 or rows <= 0.0:
        return TOPK_ROW_OVER_REPLAY * (replay or PRIOR_REPLAY_S)
    if replay <= 0.0:                        # every decode-only step had top-k rows
        replay = topk / (1.0 + TOPK_ROW_OVER_REPLAY * rows)
    return max(0.0, topk - replay) / rows


def graph_loss_s(snapshot) -> float:
    """Added seconds a decode step takes when it cannot replay a CUDA graph: 0 without
    graphs; else the engine's eager step time less its replayed one, each side from the
    other by ``EAGER_OVER_REPLAY`` when only one was timed, and ``PRIOR_REPLAY_S`` for a
    replay before any decode-only step was timed.

    Paid in full by every exact offload, also while another sequence already streams:
    the batch goes back to its graphs only when the last streamer is gone, so each one
    keeps it eager. Priced at the margin (0 once one streams) and with no decode-only
    step timed yet (0: the first pressure came while prompts were still being written),
    the headline's GPU run took 554 exact offloads, replayed no graph at all and
    finished 1 of 49 requests in 140 s (docs/BENCHMARKS.md)."""
    g = getattr(snapshot, "graphs", None) or {}
    if "num_replays" not in g:               # this engine runs no graphs
        return 0.0
    replay, eager = g.get("replay_step_s", 0.0), g.get("eager_step_s", 0.0)
    if replay > 0.0 and eager > 0.0:
        return max(0.0, eager - replay)
    if eager > 0.0:
        return eager * (1.0 - 1.0 / EAGER_OVER_REPLAY)
    return (EAGER_OVER_REPLAY - 1.0) * (replay or PRIOR_REPLAY_S)
