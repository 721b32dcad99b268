"""The engine's one config record. The daemon's ``[engine]`` section is this dataclass,
field by field (controller/config.py), so every field is settable from the TOML file,
``KVCTL_ENGINE_<FIELD>`` or ``--set engine.<field>=...``.

Torch-free on purpose: the CLI reads the config without loading torch. Zero means
"choose for me" for sizes and thread counts (TOML has no null).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOST_BYTES = 4 << 30


def available_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup v2 CPU
    quota (``cpu.max``) when one is set, as container runtimes do."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def default_num_threads(cpus: int | None = None) -> int:
    """torch's intra-op threads for the CPU engine: one core fewer than available, at
    least one. The daemon's server threads need a core of their own; and with torch's
    default (every core) one other busy process on a 2-core node made OpenMP threads
    wait on each other: 1.8-2.0 tok/s against 15.3-15.6 with 1 thread
    (docs/RELIABILITY.md, thread count)."""
    cpus = available_cpus() if cpus is None else cpus
    return max(1, cpus - 1)


@dataclass
class EngineConfig:
    model: str = "default"         # "default" | local HF dir | "random:<shape>"
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    dtype: str = "auto"            # auto | float32 | float16 | bfloat16
    block_size: int = 32           # tokens per KV block (a power of two)
    kv_budget_bytes: int = 0       # device arena; 0 = kv_budget_fraction of free memory
    kv_budget_fraction: float = 0.9
    host_budget_bytes: int = DEFAULT_HOST_BYTES  # host arena (offload, parking); 0 = none
    max_batch_tokens: int = 512    # tokens one step packs (decode + prefill chunks)
    prefill_cut_tokens: int | None = None  # a step that finishes a prompt takes no next
                                   # prompt's chunk once it holds this many tokens (the
                                   # finished prompt's first token does not wait on the next
                                   # prompt's work); None = max_batch_tokens // 4; 0 = pack
    max_running: int = 256         # sequences admitted at once
    max_waiting: int = 1024        # queued requests; beyond, submit is refused (retry later)
    num_threads: int = 0           # torch CPU threads; 0 = available CPUs - 1
    thread_nice: int = 10          # step thread's nice (Linux): server threads run first
    observe_window: int = 32       # SnapKV window over the prompt's last tokens
    stats_decay: float = 0.9
    value_group: int = 32          # channels per value scale group
    page_bytes: int = 0            # allocator page per layer; 0 = 4 full-precision slots
    staging_bytes: int = 0         # device buffer streaming offloaded blocks; 0 = auto
    num_sink_blocks: int = 1       # leading blocks eviction may not touch
    preempt_after_s: float = 1.0   # a sequence stalled this long preempts the lowest priority
    snapshot_interval_s: float = 0.1   # while steps only make progress, snapshots this often
    cuda_graphs: bool = True       # decode steps replayed as CUDA graphs (CUDA only)
    overlap_steps: str = "auto"    # launch the next decode step before reading this
                                   # one's tokens (they feed it on the device): "auto" =
                                   # with CUDA graphs; "on" also eager (CPU: same tokens,
                                   # no gain; tests); "off"
    compile_decode: bool = False   # decode steps through torch.compile around kvctl
                                   # attention (captured into the graphs on CUDA)
    graph_capture_tokens: int = 2048   # at start-up, capture every batch bucket's graph
                                   # for contexts up to this (0: capture on first use)
    # at start-up on a GPU, short requests in each of these formats (together, then each
    # alone) before the engine serves: the Triton kernels their decode steps need compile
    # then, not in the middle of a served step (a fresh H100's first adaptive run had
    # 1.4-4.3 s steps a second run did not; on an H100 the warm-up took 21.5 s and
    # compiled 22 kernels; Triton caches them on disk after the first start). () or []
    # turns it off
    warmup_formats: tuple = ("int8", "fp8", "k8v4", "int4", "k4v2", "int2")
    # at start-up (after the warm-up), move every object alive then (the model, the
    # store) out of the garbage collector's reach (gc.freeze; process-wide, undone at
    # stop): a full collection otherwise walks them all, and a snapshot's blocks set one
    # off every few builds (60 builds of 34K blocks: 4.0 s, 3.0 of it collecting; 1.2 s
    # frozen; benchmarks/snapshot_cost.py)
    gc_freeze: bool = True
    prefix_caching: bool = True    # reuse full blocks of matching token prefixes
    session_ttl_s: float = 600.0   # an idle session's KV is dropped after this long
    max_sessions: int = 256        # idle sessions kept; beyond, the least recent goes
    kv_events: bool = False        # record block stored/removed events (the daemon's
                                   # [events] section turns this on when it publishes)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("engine.model must be set ('default', a local model dir or "
                             "'random:tiny')")
        if not (self.model == "default" or self.model.startswith("random:")
                or Path(self.model).expanduser().is_dir()):
            raise ValueError(f"engine.model {self.model!r} is not 'default', 'random:<shape>' "
                             "or an existing local model directory")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or
                (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ValueError(f"engine.device must be auto, cpu, cuda or cuda:N, got {dev!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError("engine.dtype must be auto, float32, float16 or bfloat16, "
                             f"got {self.dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"engine.block_size must be a power of two, got {self.block_size}")
        if not 0 < self.kv_budget_fraction <= 1:
            raise ValueError("engine.kv_budget_fraction must be in (0, 1], got "
                             f"{self.kv_budget_fraction}")
        for name in ("kv_budget_bytes", "host_budget_bytes", "page_bytes", "staging_bytes",
                     "num_threads", "num_sink_blocks", "observe_window", "seed",
                     "graph_capture_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"engine.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_batch_tokens", "max_running", "max_waiting", "value_group"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine.{name} must be >= 1, got {getattr(self, name)}")
        if self.prefill_cut_tokens is not None and self.prefill_cut_tokens < 0:
            raise ValueError("engine.prefill_cut_tokens must be >= 0, got "
                             f"{self.prefill_cut_tokens}")
        from engine.actions import KVFormat
        self.warmup_formats = tuple(self.warmup_formats)
        for f in self.warmup_formats:
            try:
                KVFormat.parse(f)
            except (ValueError, TypeError, AttributeError):
                raise ValueError(f"engine.warmup_formats: {f!r} is not a KV format") from None
        if self.overlap_steps not in ("auto", "on", "off"):
            raise ValueError("engine.overlap_steps must be auto, on or off, got "
                             f"{self.overlap_steps!r}")
        if not 0 <= self.thread_nice <= 19:
            raise ValueError(f"engine.thread_nice must be in 0..19, got {self.thread_nice}")
        if not 0 < self.stats_decay < 1:
            raise ValueError(f"engine.stats_decay must be in (0, 1), got {self.stats_decay}")
        if not (math.isfinite(self.preempt_after_s) and self.preempt_after_s >= 0):
            raise ValueError(f"engine.preempt_after_s must be >= 0, got {self.preempt_after_s}")
        if not (math.isfinite(self.session_ttl_s) and self.session_ttl_s >= 0):
            raise ValueError(f"engine.session_ttl_s must be >= 0, got {self.session_ttl_s}")
        if self.max_sessions < 0:
            raise ValueError(f"engine.max_sessions must be >= 0, got {self.max_sessions}")
        if not (math.isfinite(self.snapshot_interval_s) and 0 <= self.snapshot_interval_s <= 5):
            raise ValueError("engine.snapshot_interval_s must be in [0, 5], got "
                             f"{self.snapshot_interval_s}")

    @property
    def threads(self) -> int:
        """The torch thread count this config asks for (0 resolved)."""
        return self.num_threads or default_num_threads()
