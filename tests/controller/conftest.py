import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.controller.fakes import FakeEngine

ROOT = Path(__file__).resolve().parents[2]


class FakeContext:
    """Enough of grpc.ServicerContext for calling servicers directly."""

    def __init__(self, peer: str = "unix:") -> None:
        self._peer = peer
        self.callbacks = []
        self.active = True

    def peer(self):
        return self._peer

    def is_active(self):
        return self.active

    def add_callback(self, cb):
        self.callbacks.append(cb)
        return True


@pytest.fixture
def ctx():
    return FakeContext()


@pytest.fixture
def fake_engine():
    e = FakeEngine(token_interval_s=0.005)
    e.start()
    yield e
    e.stop()


@pytest.fixture
def short_tmp():
    """Unix socket paths must stay under 108 bytes: pytest's tmp_path can be longer."""
    d = tempfile.mkdtemp(prefix="kv-")
    yield Path(d)
    subprocess.run(["rm", "-rf", d])


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
