import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.controller.fakes import FakeEngine

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
