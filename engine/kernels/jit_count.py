"""How many kernels Triton has compiled in this process for the engine's Triton
functions (each a specialization: formats, launch settings, and the alignment of the
integer arguments; loaded from Triton's disk cache or built, in milliseconds or seconds).

A decode step that meets a new specialization stops for its compile. On a fresh H100 the
headline's adaptive run (five formats, tables that mix them) spent its prompt phase in
1.4-4.3 s steps that a second run on the same machine, with the first one's kernels in
Triton's disk cache, did not (docs/BENCHMARKS.md, eleventh session); nothing counted the
compiles then. ``Laps`` counts them per step.

Reads only modules already imported: on the CPU (or under TRITON_INTERPRET) no Triton
kernel is compiled and nothing is imported here.
"""
from __future__ import annotations

import sys

MODULES = ("engine.kernels.paged_decode_triton", "engine.kernels.split_reduce_triton",
           "engine.kernels.write_kv_triton", "engine.kernels.gather_triton",
           "engine.kernels.fit_triton")


_FOUND: dict[str, list] = {}     # module -> its Triton functions, once it is imported


def _caches():
    """(function name, its kernel cache) for each device of each engine Triton function
    whose module is imported."""
    for name in MODULES:
        fns = _FOUND.get(name)
        if fns is None:
            mod = sys.modules.get(name)
            if mod is None:
                continue
            fns = _FOUND[name] = [obj for obj in list(vars(mod).values())
                                  if isinstance(getattr(obj, "device_caches", None), dict)]
        for fn in fns:
            for entry in list(fn.device_caches.values()):
                cache = entry[0] if isinstance(entry, tuple) else entry
                if isinstance(cache, dict):
                    yield getattr(fn, "__name__", "?"), cache


def compiled_kernels() -> int:
    """Compiled kernels held by the engine's Triton functions, over every device (a few
    dict lengths: the engine asks after every step)."""
    return sum(len(cache) for _, cache in _caches())


def compiled_keys() -> set[tuple[str, str]]:
    """(function name, specialization key) of every compiled kernel: the key names the
    constexpr values and which integer arguments were specialized (equal to 1, or
    divisible by 16), so the difference of two calls says which variants a run met that
    the warm-up did not. For benchmarks and debugging, not per step."""
    return {(fn, str(key)) for fn, cache in _caches() for key in list(cache)}
