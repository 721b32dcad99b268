"""Kernel tests run the Triton kernels compiled on CUDA, or in the interpreter on CPU.

triton.jit picks interpreter or compiler when a kernel is decorated, process-wide, so on
a machine without CUDA triton and the kernel modules are imported here, once, with
TRITON_INTERPRET=1; the variable is then restored, so subprocesses and other code never
see it. On a CUDA machine nothing is changed and the CPU (interpreter) variants skip.
"""
from __future__ import annotations

import importlib
import os
import sys

import torch


def _import_interpreted() -> None:
    if "triton" in sys.modules:
        return  # imported earlier: kernel_modules() checks the mode and fails loudly
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in ("triton", "triton.language", "triton.experimental.gluon",
                     "engine.kernels.paged_decode_triton", "engine.kernels.quant_triton",
                     "engine.kernels.gather_triton"):
            importlib.import_module(name)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


if not torch.cuda.is_available():
    _import_interpreted()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: compiled Triton kernels on a CUDA device")
