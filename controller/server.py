"""`kvctl serve`: the engine, telemetry, policy state and the gRPC server in one process.

Listens on a Unix socket (mode 0660) by default; TCP only with TLS and a bearer token.
SIGTERM/SIGINT: health NOT_SERVING, admit nothing new (UNAVAILABLE), let in-flight
generations finish within ``server.drain_grace_s``, cancel the rest, stop.
Under systemd (Type=notify) it sends READY=1, WATCHDOG=1 and STOPPING=1.

The gRPC server is `grpc.aio` on one event-loop thread (controller/aio.py says why);
blocking work runs on a worker pool of ``server.max_workers`` threads.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controller.aio import LoopThread
from controller.config import Config
from controller.errors import SERVICE, KvctlInterceptor
from controller.handlers import add_to_server
from controller.metrics import Metrics
from controller.policy import DecisionLog, PolicyState
from controller.service import KvctlService
from controller.telemetry import Telemetry
from kvctl_proto.kvctl.v1 import kvctl_pb2

log = logging.getLogger("kvctl.server")


# ---------------------------------------------------------------- logs
class _Formatter(logging.Formatter):
    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt

    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": round(record.created, 3), "level": record.levelname.lower(),
             "logger": record.name, "msg": record.getMessage(), **getattr(record, "kv", {})}
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        if self.fmt == "json":
            return json.dumps(d, default=str)
        return " ".join(f"{k}={_logfmt(v)}" for k, v in d.items())


def _logfmt(v) -> str:
    s = str(v)
    return json.dumps(s) if (not s or any(c in s for c in ' ="\n')) else s


def silence_progress_bars() -> None:
    """No tqdm bars on stderr, where the log's JSON lines go: transformers draws one
    while it loads weights ("Loading weights: 100%|...") and huggingface_hub for
    downloads. Both read HF_HUB_DISABLE_PROGRESS_BARS when first imported; for a library
    imported already, switch its bars off directly."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


def setup_logging(level: str, fmt: str) -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_Formatter(fmt))
    root = logging.getLogger("kvctl")
    root.handlers[:] = [h]
    root.setLevel(level.upper())
    root.propagate = False


# ---------------------------------------------------------------- systemd
def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to systemd's NOTIFY_SOCKET; False when not under
    systemd. The datagram protocol of sd_notify(3), no libsystemd needed."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):           # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as e:
        log.warning("sd_notify failed", extra={"kv": {"state": state, "error": str(e)}})
        return False


def watchdog_interval_s() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6             # ping at half the deadline, as sd_watchdog_enabled(3) advises


# ---------------------------------------------------------------- sockets
def prepare_socket(path: Path) -> None:
    """Make ``path`` free for the daemon's socket: remove a dead daemon's socket; refuse
    (FileExistsError) a live one and anything that is not a socket."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):        # only a dead daemon's socket is ours to remove
        what = "a directory" if stat.S_ISDIR(mode) else "a symlink" if stat.S_ISLNK(mode) \
            else "a regular file" if stat.S_ISREG(mode) else "some other file"
        raise FileExistsError(f"{path} is not a socket but {what}; kvctl leaves it alone: "
                              "remove it yourself or pick another --socket (server.socket)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()                  # stale socket of a dead daemon
    else:
        raise FileExistsError(f"another kvctl daemon is already serving on {path}; stop it "
                              "first (`systemctl stop kvctl`) or pick another --socket")
    finally:
        probe.close()


def make_engine(cfg: Config):
    from engine.handle import open_engine   # heavy (torch): only when serving

    return open_engine(cfg.engine)


class Daemon:
    """Everything `kvctl serve` runs. ``start()`` binds and returns; ``stop()`` drains."""

    def __init__(self, cfg: Config, engine=None) -> None:
        self.cfg = cfg
        self.engine = engine if engine is not None else make_engine(cfg)
        self.policy = PolicyState(cfg.policy.profile, cfg.policy.budget_bytes,
                                  cfg.policy.high_watermark, cfg.policy.low_watermark)
        self.decisions = DecisionLog()
        self.metrics = Metrics(self.decisions)
        self.telemetry = Telemetry(self.engine.handle.snapshot, cfg.telemetry.interval_s,
                                   cfg.telemetry.history)
        self.pool = futures.ThreadPoolExecutor(cfg.server.max_workers, "kvctl-work")
        self.service = KvctlService(self.engine, self.telemetry, self.policy, self.decisions,
                                    self.metrics, cfg.log.log_prompts, pool=self.pool,
                                    max_watchers=cfg.server.max_watchers)
        if cfg.policy.admission_ceiling and self.service.controller.loop is not None:
            self.service.controller.loop.admission_ceiling = cfg.policy.admission_ceiling
        self.telemetry.on_sample.append(self._on_sample)
        self.health = health.aio.HealthServicer()
        self.socket_path = Path(cfg.server.socket)
        self.tcp_port: int | None = None
        self.metrics_port: int | None = None
        self.server: grpc.aio.Server | None = None
        self.loop: LoopThread | None = None
        self.kv_events = None          # controller.kv_events.KVEventPublisher when enabled
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    def _on_sample(self, sample) -> None:
        if sample.snapshot is not None:
            self.service.controller.tick(sample.snapshot, sample.gpu)
            self.policy.forget({v.seq_id for v in sample.snapshot.sequences
                                if v.state != "finished"} | self.service.inflight_ids(),
                               as_of=sample.snapshot.time)
        self.metrics.update(sample)
        self.service.status_of(sample)

    def start(self) -> None:
        s = self.cfg.server
        token = Path(s.token_file).read_text().strip() if s.token_file else None
        if s.tcp_address and not token:
            raise ValueError(f"server.token_file {s.token_file} is empty")
        self._open_kv_events()
        prepare_socket(self.socket_path)
        self.loop = LoopThread("kvctl-grpc")
        try:
            self.loop.run(self._bind(token))
        except BaseException:
            self.loop.close()
            if self.kv_events is not None:
                self.kv_events.close()
            raise
        if hasattr(self.engine, "start"):
            # on a GPU, start() warms the kernels of every format up before it returns
            # (engine.warmup_formats; Triton caches the kernels on disk after)
            sd_notify("STATUS=starting the engine (on a GPU: warming its kernels up)")
            self.engine.start()
        self.telemetry.start()
        self.loop.run(self.server.start())
        if self.cfg.metrics.enabled:
            self.metrics_port = self.metrics.serve(self.cfg.metrics.address, self.cfg.metrics.port)
        for name in ("", SERVICE):
            self.loop.run(self.health.set(name, health_pb2.HealthCheckResponse.SERVING))
        log.info("serving", extra={"kv": {
            "socket": str(self.socket_path), "tcp": s.tcp_address or None, "tcp_port": self.tcp_port,
            "metrics_port": self.metrics_port,
            "kv_events": self.kv_events.endpoint if self.kv_events is not None else None,
            "model": getattr(self.engine, "model_name", ""),
            "mode": self.telemetry.mode, "gpu": self.telemetry.nvml.reason or "ok"}})
        sd_notify(f"READY=1\nSTATUS=serving on {self.socket_path}\nMAINPID={os.getpid()}")
        wd = watchdog_interval_s()
        if wd:
            threading.Thread(target=self._watchdog, args=(wd,), name="kvctl-watchdog",
                             daemon=True).start()

    def _open_kv_events(self) -> None:
        """Start the KV events publisher ([kv_events]) and hand its sink to the engine."""
        if not self.cfg.kv_events.enabled:
            return
        try:                           # pyzmq and msgspec only load when the feature is on
            from controller.kv_events import publisher_from_config
        except ImportError as e:
            raise OSError(f"kv_events.enabled needs pyzmq and msgspec: {e}") from None
        self.kv_events = publisher_from_config(self.cfg.kv_events)
        self.metrics.registry.register(self.kv_events)
        attach = getattr(self.engine, "set_kv_event_sink", None)
        if attach is None:
            log.warning("kv_events is enabled but this engine emits no KV events",
                        extra={"kv": {"engine": type(self.engine).__name__}})
        else:
            attach(self.kv_events.on_kv_events)

    async def _bind(self, token: str | None) -> None:
        """Build the server and bind its ports (on the loop: aio servers belong to one)."""
        s = self.cfg.server
        # no maximum_concurrent_rpcs: it counts open streams too, so with that many
        # generations streaming even health checks were refused. Generations are bounded
        # by the engine's waiting queue, decision watchers by server.max_watchers.
        self.server = grpc.aio.server(migration_thread_pool=self.pool,
                                      interceptors=[KvctlInterceptor(token)])
        add_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (kvctl_pb2.DESCRIPTOR.services_by_name["Kvctl"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        old = os.umask(0o117)          # the socket is born 0660, never briefly world-writable
        try:
            self.server.add_insecure_port(f"unix:{self.socket_path}")
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o660)
        if s.tcp_address:
            creds = grpc.ssl_server_credentials(
                [(Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes())])
            self.tcp_port = self.server.add_secure_port(s.tcp_address, creds)

    def _watchdog(self, interval: float) -> None:
        while not self._stopped.wait(interval):
            # only a daemon whose telemetry still sees the engine is alive to systemd
            if time.time() - self.telemetry.latest().time < max(10.0, 4 * interval):
                sd_notify("WATCHDOG=1")

    def stop(self, grace_s: float | None = None) -> None:
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace = self.cfg.server.drain_grace_s if grace_s is None else grace_s
            sd_notify("STOPPING=1")
            live = self.loop is not None and self.loop.is_running
            if live:
                self.loop.run(self.health.enter_graceful_shutdown())   # every service NOT_SERVING
            n_inflight = self.service.num_inflight
            log.info("draining", extra={"kv": {"in_flight": n_inflight, "grace_s": grace}})
            cancelled = self.service.drain(grace)
            if live:
                if self.server is not None:
                    self.loop.run(self.server.stop(grace=2))
                self.loop.close()
            self.pool.shutdown(wait=True)    # pending cancels of abandoned streams still run
            self.telemetry.stop()
            if hasattr(self.engine, "stop"):
                self.engine.stop(timeout=10)
            if self.kv_events is not None:   # after the engine: its last step's events go out
                self.kv_events.close()
            self.metrics.stop()
            try:
                self.socket_path.unlink()
            except FileNotFoundError:
                pass
            gc.unfreeze()              # let interpreter exit free them as usual
            self._stopped.set()
            log.info("stopped", extra={"kv": {"finished": n_inflight - cancelled,
                                              "cancelled": cancelled}})

    def run_until_signal(self) -> None:
        """Block until SIGTERM/SIGINT, then drain and stop (main thread only)."""
        got = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: got.set())
        try:
            while not got.wait(1.0):
                pass
        finally:
            self.stop()


def serve(cfg: Config) -> None:
    setup_logging(cfg.log.level.value, cfg.log.format.value)
    silence_progress_bars()

    prepare_socket(Path(cfg.server.socket))   # fail before the slow engine load
    t0 = time.monotonic()
    daemon = Daemon(cfg)
    log.info("engine loaded", extra={"kv": {"seconds": round(time.monotonic() - t0, 2)}})
    # the model, tokenizer and libraries are long-lived objects: moved out of the
    # collector's view, a full collection no longer stalls every thread for 100+ ms
    # (GetStatus max under load 212-442 ms before, 19-51 ms after; docs/BENCHMARKS.md)
    gc.collect()
    gc.freeze()
    daemon.start()
    daemon.run_until_signal()
