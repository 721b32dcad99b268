"""Launch settings of the paged decode kernel (engine/kernels/paged_decode_triton.py).

Heuristics instead of autotuning: decode shapes change every step, and an autotuner would
time configurations inside the engine's step. The numbers come from launch sweeps on the
H200 and H100 (docs/BENCHMARKS.md, "Decode kernel launch settings"). Also here: the
per-step cache of compiled launches that lets the layers of a step skip Triton's
argument binding.

Torch and plain Python only (no Triton import): the settings are testable anywhere.
"""
from __future__ import annotations

import torch

from engine.layout import KVFormat

SPLIT_WAVES = 8     # programs ~ SPLIT_WAVES x SMs: the best multiple in the sweep
MIN_ITERS = 8       # loop iterations a program runs at least (shorter runs: mostly prologue)
# ... except over short tables (at most SHORT_TABLE columns: 8K tokens at block 32), where
# a program's chain of dependent iterations is the kernel's time, not its prologue: at
# batch 1 over a 128-column graph table (1K tokens in it) 8-iteration runs took 15.6 us a
# layer, 7% of an 8B model's step (docs/BENCHMARKS.md, "Overlapped steps")
SHORT_TABLE = 256
MIN_ITERS_SHORT = 2
MIN_TILE_TOKENS = 32  # tokens an iteration of a quantized format reads at least (fp16)
# a grouped table of two formats (old blocks quantized, the newest full) in one launch
FUSE_TWO_FORMATS = True

# programs of one compiled decode kernel that fit on an SM at once, from its registers and
# shared memory (found after its first launch; keyed by its compile-time configuration)
RESIDENT: dict[tuple, int] = {}


def launch(fn, grid, args: tuple, consts: dict, options: dict, cache: dict | None):
    """``fn[grid](*args, **consts, **options)``; returns the compiled kernel.

    With ``cache`` (a dict that lives for one engine step, CUDA): the compiled kernel of an
    earlier launch whose arguments specialize the same way (same scalars, constexprs and
    options; tensors of the same dtype, device and 16-byte alignment) is launched
    directly, without Triton's per-call argument binding and cache lookup. The layers of a
    step launch with the same table and scalars, so only the first layer pays for that."""
    if cache is None:
        return fn[grid](*args, **consts, **options)
    spec = ("triton-launch", fn, grid) + tuple(
        (a.dtype, a.device, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a
        for a in args) + tuple(consts.items()) + tuple(options.items())
    hit = cache.get(spec)
    if hit is None:
        ck = fn[grid](*args, **consts, **options)
        tail = tuple(consts[p.name] if p.name in consts else p.default
                     for p in fn.params[len(args):])
        cache[spec] = (ck, tail)
        return ck
    ck, tail = hit
    ck[tuple(grid) + (1,) * (3 - len(grid))](*args, *tail)   # the runner takes 3 dims
    return ck


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs, each is ~1 ms of Python


def resident_programs(ck, device: torch.device) -> int | None:
    """How many programs of compiled kernel ``ck`` an SM holds at once (None: unknown)."""
    try:
        props = torch.cuda.get_device_properties(device)
        warps = ck.metadata.num_warps
        regs = max(1, ck.n_regs) * 32 * warps
        by_regs = props.regs_per_multiprocessor // regs
        smem = ck.metadata.shared + 1024          # the driver reserves 1 KB a block
        by_smem = props.shared_memory_per_multiprocessor // max(1, smem)
        by_warps = props.max_threads_per_multi_processor // (32 * warps)
        return max(1, min(by_regs, by_smem, by_warps))
    except (AttributeError, RuntimeError, TypeError):
        return None


def format_defaults(fmt: KVFormat, cuda: bool) -> tuple[int, int, int | None]:
    """(blocks_per_iter, num_stages, maxnreg) for a format compiled into the kernel: the
    fastest of the launch sweeps per format. int8 / int4 (and fp8, not swept yet: it reads
    as many bytes as int8): 2 blocks an iteration, 2 stages, 128 registers (4 programs an
    SM); full precision and int2: 2 blocks, 2 stages; other mixes 4 blocks, 3 stages (2
    with 8-bit codes), 168 registers. 2 stages let Triton prefetch the next iteration's
    tiles (cp.async)."""
    same = fmt.k_code == fmt.v_code
    if same and fmt.k_bits in (8, 4):
        return 2, 2, 128 if cuda else None
    wide = max(fmt.k_bits, fmt.v_bits) >= 4
    stages = 3 if wide and fmt.k_bits != 8 and fmt.v_bits != 8 else 2
    return (4 if wide else 2), stages, (168 if cuda and (wide or fmt.is_full) else None)


def default_word_codes(fmt: KVFormat, cuda: bool) -> bool | str:
    """int8 keys read as int32 words on CUDA, where that measured faster; int4 words
    measured slower (more shared-memory traffic)."""
    return "k" if cuda and fmt.k_code == fmt.v_code == 8 else False


def min_blocks_per_iter(fmt: KVFormat, block_size: int, fp16_codes: bool) -> int:
    """Quantized tiles of fewer than MIN_TILE_TOKENS tokens with fp16 operands (16-token
    blocks one at a time) gave wrong int4 results on the H200 with triton 3.6 (right in the
    interpreter)."""
    if fp16_codes and not fmt.is_full:
        return max(1, MIN_TILE_TOKENS // block_size)
    return 1


def min_iters(NB: int) -> int:
    """Loop iterations a split runs at least over a table of ``NB`` columns."""
    return MIN_ITERS_SHORT if NB <= SHORT_TABLE else MIN_ITERS


def launch_config(B: int, H: int, NB: int, device: torch.device, num_splits: int | None,
                  blocks_per_iter: int, resident: int | None = None) -> tuple[int, int]:
    """(num_splits, blocks_per_split) of a launch over ``NB`` table columns.

    Enough programs for a few waves over the SMs, each with a run of blocks long enough to
    hide the per-program setup and the split reduction. With ``resident`` (programs an SM
    holds, known after the first launch): whole waves, since a last, partial wave leaves
    SMs idle at the end."""
    nbi = blocks_per_iter
    if num_splits is None:
        sms = num_sms(device)
        target = SPLIT_WAVES * sms
        most = max(1, -(-NB // (min_iters(NB) * nbi)))
        if resident:
            # the whole number of waves nearest the target, no more than the runs allow,
            # as many programs as fit in them
            wave = resident * sms
            waves = max(1, min(round(target / wave), most * B * H // wave))
            num_splits = max(1, min(waves * wave // (B * H), most))
        else:
            num_splits = max(1, min(-(-target // (B * H)), most))
    num_splits = max(1, min(num_splits, NB))
    bps = -(-NB // num_splits)
    bps = -(-bps // nbi) * nbi          # whole iterations per split
    return -(-NB // bps), bps
