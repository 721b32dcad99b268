"""Kernels: each file has a Triton kernel, a checked wrapper, and a torch reference.

The torch reference is the CPU path and the tests' oracle.
"""
