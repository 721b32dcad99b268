"""Generate the Python stubs of proto/kvctl/v1/kvctl.proto into the package kvctl_proto.

    python tools/gen_proto.py            # writes kvctl_proto/ (what `make proto` runs)
    python tools/gen_proto.py --out DIR  # writes DIR/kvctl_proto/ (the drift test)

One pinned generator: grpcio-tools GRPC_TOOLS_PIN (also pinned in pyproject's dev extra).
Its stubs embed two version checks, which decide the pin: the *_pb2_grpc.py module
refuses grpcio older than the generator (1.84.0 -> the GPU image's grpcio 1.84 passes),
and *_pb2.py refuses a protobuf runtime older than its gencode version (7.35.1, the
floor grpcio-tools/-health-checking 1.84 themselves require).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

GRPC_TOOLS_PIN = "1.84.0"
ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PROTO_FILES = ("kvctl/v1/kvctl.proto",)
PACKAGE = "kvctl_proto"


def _check_generator() -> None:
    from importlib.metadata import version

    have = version("grpcio-tools")
    if have != GRPC_TOOLS_PIN:
        sys.exit(f"grpcio-tools {have} is installed, the stubs are generated with "
                 f"{GRPC_TOOLS_PIN}: pip install grpcio-tools=={GRPC_TOOLS_PIN}")


def generate(out: Path) -> list[Path]:
    """Write the stubs under ``out/kvctl_proto`` and return the files written."""
    _check_generator()
    pkg = out / PACKAGE
    pkg.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}",
           f"--python_out={pkg}", f"--pyi_out={pkg}", f"--grpc_python_out={pkg}",
           *PROTO_FILES]
    subprocess.run(cmd, check=True, cwd=ROOT)
    written = []
    for proto in PROTO_FILES:
        parent = Path(proto).parent
        for d in [pkg, *(pkg / Path(*parent.parts[:i + 1]) for i in range(len(parent.parts)))]:
            init = d / "__init__.py"
            if not init.exists():
                init.write_text("")
            written.append(init)
        for f in sorted((pkg / parent).glob(Path(proto).stem + "_pb2*")):
            # protoc writes `from kvctl.v1 import kvctl_pb2`; the package is kvctl_proto
            text = re.sub(r"^from (kvctl\.v1) import", rf"from {PACKAGE}.\1 import",
                          f.read_text(), flags=re.M)
            f.write_text(text)
            written.append(f)
    return sorted(set(written))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT, help="directory to write kvctl_proto/ into")
    args = ap.parse_args()
    for f in generate(args.out):
        print(f.relative_to(args.out))


if __name__ == "__main__":
    main()
