import queue
import subprocess
import tempfile
from pathlib import Path

import pytest

from controller.aio import LoopThread
from kvctl_proto.kvctl.v1 import kvctl_pb2 as pb
from tests.controller.fakes import FakeEngine


class FakeContext:
    """Enough of grpc.aio.ServicerContext for calling servicers directly: what a
    streaming handler writes lands in ``written`` (a thread-safe queue)."""

    def __init__(self, peer: str = "unix:") -> None:
        self._peer = peer
        self.written: queue.Queue = queue.Queue()

    def peer(self):
        return self._peer

    async def write(self, message):
        if isinstance(message, bytes):   # Generate writes its messages serialized (identity
            message = pb.GenerateResponse.FromString(message)   # serializer in the daemon)
        self.written.put(message)

    async def abort(self, code, details=""):
        raise AssertionError("kvctl's handlers raise; only the interceptor aborts")


@pytest.fixture
def ctx():
    return FakeContext()


@pytest.fixture
def loop():
    """An event loop on its own thread, as the daemon runs its servicer."""
    lt = LoopThread("test-loop")
    yield lt
    lt.close()


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
