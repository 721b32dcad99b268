"""gRPC client side of kvctl (used by the CLI). Imports neither torch nor the engine."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from kvctl_proto.kvctl.v1 import kvctl_pb2 as pb  # noqa: F401  (re-exported for callers)
from kvctl_proto.kvctl.v1 import kvctl_pb2_grpc


class DaemonUnreachable(Exception):
    """The daemon is not running, or not where the client looked."""


@dataclass
class Target:
    socket: str | None = None
    address: str | None = None      # host:port over TLS
    token_file: str | None = None
    tls_ca: str | None = None
    tls_server_name: str | None = None
    timeout_s: float = 10.0

    def describe(self) -> str:
        return f"{self.address} (TLS)" if self.address else f"unix:{self.socket}"


class Client:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.metadata: tuple[tuple[str, str], ...] = ()
        if target.token_file:
            try:
                token = Path(target.token_file).read_text().strip()
            except OSError as e:
                raise DaemonUnreachable(f"cannot read token file {target.token_file}: {e.strerror}")
            self.metadata = (("authorization", f"Bearer {token}"),)
        if target.address:
            ca = None
            if target.tls_ca:
                try:
                    ca = Path(target.tls_ca).read_bytes()
                except OSError as e:
                    raise DaemonUnreachable(f"cannot read TLS CA {target.tls_ca}: {e.strerror}")
            opts = [("grpc.ssl_target_name_override", target.tls_server_name)] \
                if target.tls_server_name else []
            self.channel = grpc.secure_channel(target.address,
                                               grpc.ssl_channel_credentials(root_certificates=ca),
                                               options=opts)
        else:
            sock = target.socket
            if not sock or not os.path.exists(sock):
                raise DaemonUnreachable(
                    f"kvctl daemon is not running: no socket at {sock}. Start it with "
                    "`kvctl serve` (or `systemctl start kvctl`), or point --socket at it")
            self.channel = grpc.insecure_channel(f"unix:{sock}")
        self.stub = kvctl_pb2_grpc.KvctlStub(self.channel)

    def call(self, name: str, request, timeout: float | None = None):
        return getattr(self.stub, name)(request, metadata=self.metadata,
                                        timeout=timeout or self.target.timeout_s)

    def stream(self, name: str, request):
        """Server stream without a deadline (generation and watches run long)."""
        return getattr(self.stub, name)(request, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()


def explain(err: grpc.RpcError, target: Target) -> str:
    """One line a person can act on."""
    code = err.code()
    if code == grpc.StatusCode.UNAVAILABLE and "shutting down" not in (err.details() or ""):
        return (f"cannot reach the kvctl daemon at {target.describe()}: {err.details()}. "
                "Is it running? (`systemctl status kvctl`)")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the daemon at {target.describe()} did not answer within {target.timeout_s}s"
    return f"{code.name}: {err.details()}"
