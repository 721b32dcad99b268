"""Kernel tests run the Triton kernels compiled on CUDA, or in the interpreter on CPU.

triton.jit picks interpreter or compiler when a kernel is decorated, process-wide, so on
a machine without CUDA triton and the kernel modules are imported once with
TRITON_INTERPRET=1 (tests/conftest.py, before anything else can import triton); the
variable is then restored, so subprocesses never see it. On a CUDA machine nothing is
changed and the CPU (interpreter) variants skip.
"""
from __future__ import annotations

# The interpreter set-up itself runs from tests/conftest.py (tests_kernels_setup.py),
# before any test module imports transformers, which imports triton.


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: compiled Triton kernels on a CUDA device")
