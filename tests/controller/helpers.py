"""Helpers shared by the daemon tests (certificates, ports, waiting, child processes)."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def make_tls(dir: Path, cn: str = "localhost") -> tuple[Path, Path]:
    if subprocess.run(["which", "openssl"], capture_output=True).returncode:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = dir / "cert.pem", dir / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", f"/CN={cn}", "-addext", f"subjectAltName=DNS:{cn},IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float = 30.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCTL_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **extra)
    return env


KVCTL = [sys.executable, "-m", "controller.cli"]


def tiny_engine(**overrides):
    """The 2-layer random Llama behind a real Engine, with small arenas and pages."""
    from engine.engine import Engine, EngineConfig
    cfg = dict(model="random:tiny", device="cpu", dtype="float32", block_size=4,
               kv_budget_bytes=2 << 20, host_budget_bytes=2 << 20, page_bytes=4096,
               staging_bytes=256 << 10)
    return Engine(EngineConfig(**{**cfg, **overrides}))


class ErrorLog:
    """Every ERROR record of the ``kvctl`` loggers while attached (``with ErrorLog() as e``)."""

    def __init__(self) -> None:
        import logging

        class _Handler(logging.Handler):
            def emit(inner, record):
                self.records.append(record)
        self.records: list = []
        self._handler = _Handler(logging.ERROR)

    def __enter__(self) -> "ErrorLog":
        import logging
        logging.getLogger("kvctl").addHandler(self._handler)
        return self

    def __exit__(self, *exc) -> None:
        import logging
        logging.getLogger("kvctl").removeHandler(self._handler)

    def text(self, n: int = 3) -> str:
        import logging
        fmt = logging.Formatter("%(name)s %(levelname)s %(message)s")
        return "\n".join(fmt.format(r) for r in self.records[:n])


def tiny_daemon(**overrides):
    """An in-process daemon on the real tiny random model, on a fresh Unix socket, with
    its ERROR log records collected in ``.errors`` (a generator for module fixtures)."""
    import tempfile

    from controller.config import load_config
    from controller.server import Daemon

    d = tempfile.mkdtemp(prefix="kv-")
    cfg = load_config(overrides={"server.socket": f"{d}/kvctl.sock",
                                 "engine.model": "random:tiny", "engine.num_threads": 1,
                                 "engine.thread_nice": 0, "telemetry.interval_s": 0.05,
                                 **overrides}, env={})
    dm = Daemon(cfg)
    with ErrorLog() as errors:
        dm.start()
        dm.errors = errors
        try:
            yield dm
        finally:
            dm.stop(grace_s=1)
