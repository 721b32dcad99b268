"""The committed stubs in kvctl_proto/ are exactly what the pinned generator makes."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import gen_proto  # noqa: E402


def test_stubs_match_proto(tmp_path):
    written = gen_proto.generate(tmp_path)
    assert written, "the generator wrote nothing"
    drifted = []
    for f in written:
        rel = f.relative_to(tmp_path)
        committed = ROOT / rel
        if not committed.exists() or committed.read_text() != f.read_text():
            drifted.append(str(rel))
    assert not drifted, f"stale stubs {drifted}: run `make proto` and commit kvctl_proto/"


def test_generator_pin_matches_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    assert f'"grpcio-tools=={gen_proto.GRPC_TOOLS_PIN}"' in text


def _floor(text: str, name: str) -> tuple[int, ...]:
    m = re.search(rf'"{name}>=([0-9.]+)"', text)
    assert m, f"pyproject declares no floor for {name}"
    return tuple(int(x) for x in m.group(1).split("."))


def test_runtime_floors_satisfy_embedded_version_checks():
    """An install at pyproject's floors must import the stubs: the stubs refuse a runtime
    older than the generator, so the declared floors may not be lower than that."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    pb2 = (ROOT / "kvctl_proto/kvctl/v1/kvctl_pb2.py").read_text()
    grpc_stub = (ROOT / "kvctl_proto/kvctl/v1/kvctl_pb2_grpc.py").read_text()
    m = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", pb2)
    assert m, "no protobuf runtime check found in kvctl_pb2.py"
    gencode = tuple(int(x) for x in m.groups())
    assert _floor(pyproject, "protobuf") >= gencode
    g = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", grpc_stub)
    assert g, "no grpc version check found in kvctl_pb2_grpc.py"
    generated = tuple(int(x) for x in g.group(1).split("."))
    assert _floor(pyproject, "grpcio") >= generated
    # the GPU image runs grpcio 1.84: the stubs must not demand more
    assert generated <= (1, 84, 99)


def test_absolute_imports_and_service_shape():
    from kvctl_proto.kvctl.v1 import kvctl_pb2, kvctl_pb2_grpc

    service = kvctl_pb2.DESCRIPTOR.services_by_name["Kvctl"]
    methods = {m.name: m for m in service.methods}
    for name in ("Generate", "Cancel", "GetStatus", "ListSequences", "GetSequence",
                 "GetPolicy", "SetPolicy", "Pin", "Unpin", "WatchDecisions",
                 "EstimateCapacity", "ListSessions", "DropSession"):
        assert name in methods, name
    assert methods["Generate"].server_streaming
    assert methods["WatchDecisions"].server_streaming
    assert not methods["GetStatus"].server_streaming
    assert kvctl_pb2.DESCRIPTOR.package == "kvctl.v1"
    assert hasattr(kvctl_pb2_grpc, "KvctlStub")


@pytest.mark.parametrize("field", ["profile", "budget_bytes", "high_watermark", "low_watermark"])
def test_set_policy_fields_have_presence(field):
    from kvctl_proto.kvctl.v1 import kvctl_pb2

    req = kvctl_pb2.SetPolicyRequest()
    assert not req.HasField(field)
