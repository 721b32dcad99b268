"""The daemon's one config: a TOML file, then ``KVCTL_<SECTION>_<KEY>`` env vars, then CLI
overrides, into a dataclass tree validated in ``__post_init__``.

    [server]  socket, tcp_address, tls_cert, tls_key, token_file, max_workers, drain_grace_s
    [engine]  every field of engine.config.EngineConfig (model, device, budgets, ...)
    [policy]  profile, budget_bytes, high_watermark, low_watermark
    [metrics] enabled, address, port
    [log]     level, format, log_prompts
    [telemetry] interval_s, history
    [kv_events] enabled, endpoint, replay_endpoint, topic, buffer_steps, max_queue_size, hwm,
              encoding (vLLM's KV events for cluster routers; controller/kv_events.py)

Example: ``KVCTL_ENGINE_MODEL=random:tiny`` or ``kvctl serve --set engine.model=random:tiny``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from controller.policy import check_watermarks
from controller.profiles import PROFILE_NAMES
from engine.config import EngineConfig

DEFAULT_CONFIG_PATH = Path("/etc/kvctl/kvctl.toml")


class LogLevel(str, Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class LogFormat(str, Enum):
    json = "json"
    logfmt = "logfmt"


def default_socket_path() -> Path:
    """/run/kvctl/kvctl.sock for root (when /run/kvctl is writable or creatable), else
    $XDG_RUNTIME_DIR/kvctl/kvctl.sock, else /tmp/kvctl-$UID/kvctl.sock."""
    run = Path("/run/kvctl")
    if os.geteuid() == 0 and (os.access(run, os.W_OK) or
                              (not run.exists() and os.access(run.parent, os.W_OK))):
        return run / "kvctl.sock"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.access(xdg, os.W_OK):
        return Path(xdg) / "kvctl" / "kvctl.sock"
    return Path(f"/tmp/kvctl-{os.geteuid()}") / "kvctl.sock"


SYSTEM_SOCKET = Path("/run/kvctl/kvctl.sock")


def client_socket_path() -> Path:
    """Where the CLI looks by default: the system service's socket when it exists (the
    unit runs as user kvctl; members of group kvctl may connect), else this user's."""
    return SYSTEM_SOCKET if SYSTEM_SOCKET.exists() else default_socket_path()


def _check_file(what: str, path: str) -> None:
    if not Path(path).is_file():
        raise ValueError(f"{what} {path!r} does not exist or is not a file")


@dataclass
class ServerConfig:
    socket: str = ""                 # empty = default_socket_path()
    tcp_address: str = ""            # "host:port"; empty = no TCP listener
    tls_cert: str = ""               # PEM; required with tcp_address
    tls_key: str = ""
    token_file: str = ""             # bearer token for mutating RPCs over TCP
    max_workers: int = 32            # worker threads for blocking work (tokenizing, ...)
    max_watchers: int = 64           # WatchDecisions streams at once; beyond: RESOURCE_EXHAUSTED
    drain_grace_s: float = 30.0      # SIGTERM: time in-flight requests get to finish

    def __post_init__(self) -> None:
        if not self.socket:
            self.socket = str(default_socket_path())
        if not os.path.isabs(self.socket):
            raise ValueError(f"server.socket must be an absolute path, got {self.socket!r}")
        if len(self.socket.encode()) > 107:
            raise ValueError(f"server.socket path is too long for a Unix socket "
                             f"({len(self.socket.encode())} > 107 bytes): {self.socket}")
        if self.tcp_address:
            host, sep, port = self.tcp_address.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"server.tcp_address must be HOST:PORT, got {self.tcp_address!r}")
            missing = [k for k in ("tls_cert", "tls_key", "token_file") if not getattr(self, k)]
            if missing:
                raise ValueError(
                    f"server.tcp_address={self.tcp_address} needs TLS and a token: set "
                    + ", ".join(f"server.{k}" for k in missing)
                    + " (mutating RPCs are never open to anyone who can reach a port)")
            _check_file("server.tls_cert", self.tls_cert)
            _check_file("server.tls_key", self.tls_key)
            _check_file("server.token_file", self.token_file)
            try:
                token = Path(self.token_file).read_text().strip()
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"server.token_file {self.token_file} cannot be read: {e}") from None
            if not token:    # found here, before the model loads, not after
                raise ValueError(f"server.token_file {self.token_file} is empty: put the bearer "
                                 "token in it (one line)")
        if self.max_workers < 4:
            raise ValueError(f"server.max_workers must be >= 4, got {self.max_workers}")
        if self.max_watchers < 1:
            raise ValueError(f"server.max_watchers must be >= 1, got {self.max_watchers}")
        if self.drain_grace_s < 0:
            raise ValueError(f"server.drain_grace_s must be >= 0, got {self.drain_grace_s}")


@dataclass
class PolicySection:
    profile: str = "balanced"
    budget_bytes: int = 0            # 0 = the engine's GPU-tier capacity
    high_watermark: float = 0.90
    low_watermark: float = 0.75
    # the predicted accuracy cost a running sequence may pay, in all, by moves below int4
    # or evicting, for room for waiting requests (controller/loop.py
    # PolicyLoop.admission_ceiling); 0 = no limit. An experiment (docs/BENCHMARKS.md,
    # "An admission ceiling")
    admission_ceiling: float = 0.0

    def __post_init__(self) -> None:
        if not (self.admission_ceiling >= 0 and math.isfinite(self.admission_ceiling)):
            raise ValueError("policy.admission_ceiling must be a finite number >= 0 "
                             f"(0: no limit), got {self.admission_ceiling}")
        if self.profile not in PROFILE_NAMES:
            raise ValueError(f"policy.profile must be one of {', '.join(PROFILE_NAMES)}, "
                             f"got {self.profile!r}")
        if self.budget_bytes < 0:
            raise ValueError(f"policy.budget_bytes must be >= 0, got {self.budget_bytes}")
        check_watermarks(self.high_watermark, self.low_watermark)


@dataclass
class MetricsSection:
    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = 9464

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:   # 0 = any free port (tests)
            raise ValueError(f"metrics.port must be in [0, 65535], got {self.port}")
        if not self.address:
            raise ValueError("metrics.address must be set (127.0.0.1 keeps it local)")


@dataclass
class LogSection:
    level: LogLevel = LogLevel.info
    format: LogFormat = LogFormat.json
    log_prompts: bool = False        # prompt text never reaches the logs unless set

    def __post_init__(self) -> None:
        self.level = _enum(LogLevel, self.level, "log.level")
        self.format = _enum(LogFormat, self.format, "log.format")


@dataclass
class TelemetrySection:
    interval_s: float = 0.25
    history: int = 240               # samples kept in the ring buffer

    def __post_init__(self) -> None:
        if not 0.01 <= self.interval_s <= 60:
            raise ValueError(f"telemetry.interval_s must be in [0.01, 60], got {self.interval_s}")
        if self.history < 1:
            raise ValueError(f"telemetry.history must be >= 1, got {self.history}")


class KVEventsEncoding(str, Enum):
    map = "map"                      # vLLM after PR #42892 (events as tagged maps)
    array = "array"                  # vLLM before it (events as positional arrays)


_ZMQ_TRANSPORTS = ("tcp://", "ipc://", "inproc://")


@dataclass
class KVEventsSection:
    enabled: bool = False
    endpoint: str = "tcp://*:5557"   # PUB socket: bound if it has * (or ::, ipc://), else connected
    replay_endpoint: str = ""        # ROUTER socket for replays of recent batches; "" = none
    topic: str = ""                  # first frame of every message (subscribers filter on it)
    buffer_steps: int = 10_000       # batches kept for replay
    max_queue_size: int = 10_000     # batches waiting for the publisher thread; beyond, dropped
    hwm: int = 100_000               # ZeroMQ send high-water mark of the PUB socket
    encoding: KVEventsEncoding = KVEventsEncoding.map

    def __post_init__(self) -> None:
        self.encoding = _enum(KVEventsEncoding, self.encoding, "kv_events.encoding")
        for name in ("endpoint", "replay_endpoint"):
            v = getattr(self, name)
            if (v or name == "endpoint") and not v.startswith(_ZMQ_TRANSPORTS):
                raise ValueError(f"kv_events.{name} must be a ZeroMQ endpoint "
                                 f"(tcp://HOST:PORT, ipc://PATH or inproc://NAME), got {v!r}")
        if self.replay_endpoint and self.replay_endpoint == self.endpoint:
            raise ValueError("kv_events.replay_endpoint must differ from kv_events.endpoint")
        for name in ("buffer_steps", "max_queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"kv_events.{name} must be >= 1, got {getattr(self, name)}")
        if self.hwm < 0:
            raise ValueError(f"kv_events.hwm must be >= 0 (0: no limit), got {self.hwm}")


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)   # engine/config.py
    policy: PolicySection = field(default_factory=PolicySection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    log: LogSection = field(default_factory=LogSection)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)
    kv_events: KVEventsSection = field(default_factory=KVEventsSection)


def _enum(cls, value, name):
    try:
        return cls(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {', '.join(m.value for m in cls)}, got {value!r}") from None


def _coerce(tp, raw, name: str, strict: bool = False):
    """Turn a TOML value (``strict``: types must match) or an env/CLI string into the
    field's type."""
    if isinstance(tp, type) and issubclass(tp, Enum):
        return raw if isinstance(raw, tp) else _enum(tp, raw, name)
    if strict and isinstance(raw, str) and tp is not str:
        raise ValueError(f"{name} must be a {tp.__name__}, not the string {raw!r} (drop the quotes)")
    if not isinstance(raw, str):
        if tp is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if tp is bool and not isinstance(raw, bool) or tp is int and isinstance(raw, bool) \
                or tp in (int, float, str) and not isinstance(raw, tp):
            raise ValueError(f"{name} must be a {tp.__name__}, got {raw!r}")
        return raw
    if tp is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name} must be true or false, got {raw!r}")
    if tp is int:
        try:
            return int(float(raw)) if "e" in raw.lower() else int(raw.replace("_", ""))
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {raw!r}") from None
    return raw


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, object] | None = None,
                env: typing.Mapping[str, str] | None = None) -> Config:
    """File (``path``; the default path only if it exists), then ``KVCTL_SECTION_KEY`` env
    vars, then ``overrides`` ({"engine.model": "random:tiny"}). Raises ValueError."""
    env = os.environ if env is None else env
    raw: dict[str, dict[str, object]] = {}
    if path is None and "KVCTL_CONFIG" in env:
        path = env["KVCTL_CONFIG"]
    if path is not None or DEFAULT_CONFIG_PATH.is_file():
        p = Path(path) if path is not None else DEFAULT_CONFIG_PATH
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ValueError(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {p} is not valid TOML: {e}") from None
    sections = _sections()
    values: dict[str, dict[str, object]] = {s: {} for s in sections}
    for sec, table in raw.items():
        if sec not in sections or not isinstance(table, dict):
            raise ValueError(f"unknown config section [{sec}]; known: {', '.join(sections)}")
        values[sec].update({k: (v, True) for k, v in table.items()})
    for sec in sections:
        for f in dataclasses.fields(sections[sec]):
            key = f"KVCTL_{sec.upper()}_{f.name.upper()}"
            if key in env:
                values[sec][f.name] = (env[key], False)
    for dotted, v in (overrides or {}).items():
        sec, _, key = dotted.partition(".")
        if sec not in sections:
            raise ValueError(f"unknown config key {dotted!r}; sections: {', '.join(sections)}")
        values[sec][key] = (v, False)
    built = {}
    for sec, cls in sections.items():
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values[sec]) - known
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))} in [{sec}]; "
                             f"known: {', '.join(sorted(known))}")
        kwargs = {k: _coerce(_strip_optional(hints[k]), v, f"{sec}.{k}", strict)
                  for k, (v, strict) in values[sec].items()}
        built[sec] = cls(**kwargs)
    return Config(**built)


def _strip_optional(tp):
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp
