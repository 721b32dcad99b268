"""Import triton and the kernel modules with TRITON_INTERPRET=1 (CPU machines only).

Called from tests/conftest.py before any test module is collected; the variable is
restored afterwards, so subprocesses never see it.
"""
from __future__ import annotations

import importlib
import os
import sys

KERNEL_MODULES = ("engine.kernels.codes_triton", "engine.kernels.split_reduce_triton",
                  "engine.kernels.paged_decode_triton", "engine.kernels.gather_triton",
                  "engine.kernels.write_kv_triton", "engine.kernels.fit_triton",
                  "engine.kernels.quantize_slots_triton")


def import_interpreted() -> None:
    if "triton" in sys.modules:
        return  # imported earlier: kernel_cases.kernel_module() fails loudly
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in ("triton", "triton.language", "triton.experimental.gluon",
                     *KERNEL_MODULES):
            importlib.import_module(name)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
