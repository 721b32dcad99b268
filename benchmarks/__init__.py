"""Benchmarks, evaluations and studies: outside the product packages, never imported by
them. Run from the repository root: ``python -m benchmarks.<name>`` (``make bench``)."""
