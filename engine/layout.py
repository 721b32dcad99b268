"""Byte layout of one KV block slot in the arena.

Every block of a sequence lives in one *slot*: a contiguous byte range of the arena,
identical in every layer (the arena is ``[num_layers, arena_bytes]`` uint8, so a block
id's byte offset is the same in each layer's row). A slot holds the block's keys then
its values, each in the block's format:

* full precision (bits == 0): ``data [H, T, D]`` in the store dtype.
* quantized (bits in 8/4/2), asymmetric min/scale codes (KIVI, Liu et al. 2024):
  - keys, per channel over the block's tokens:
      ``codes [H, T, D * bits / 8] uint8``, ``scale [H, D] meta``, ``zero [H, D] meta``
  - values, per token over groups of ``G`` channels:
      ``codes [H, T, D * bits / 8] uint8``, ``scale [H, T, D/G] meta``, ``zero [H, T, D/G] meta``
      except 8-bit value codes, stored channel-major: ``codes [H, D, T] uint8``
      (``values_channel_major``). The decode kernel reads value codes along the tokens
      (the reduction axis of p @ V); token-major bytes had to be gathered one by one from
      shared memory, channel-major ones are read 8-16 bytes at a time (faster for 8-bit
      codes; 4- and 2-bit codes measured no gain or a loss: docs/BENCHMARKS.md).
  Codes pack ``8 / bits`` channels per byte, low bits first: channel ``d`` sits in byte
  ``d // (8 // bits)`` at bit ``(d % (8 // bits)) * bits``. ``x = code * scale + zero``.
* fp8 (an 8-bit side of a format with ``fmt.fp8``): float8 e4m3 values, one scale per
  (block, kv head), no zero (the format vLLM, SGLang and TensorRT-LLM ship):
  - keys: ``codes [H, T, D] e4m3``, ``scale [H] meta``
  - values: ``codes [H, D, T] e4m3`` (channel-major, as 8-bit value codes), ``scale [H] meta``
  ``x = float(code) * scale``. e4m3's exponent covers the keys' outlier channels (~9x the
  median channel) under one scale; per-channel key scales measured no better
  (docs/BENCHMARKS.md).

Head-major (``[H, T, D]``) so that one (block, kv head) tile is contiguous for the
decode kernel. Sections start on ``ALIGN``-byte boundaries, so typed views of the arena
(store dtype, meta dtype) index every section with whole elements.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

# the format record is part of the handle's vocabulary (torch-free): engine/actions.py
from engine.actions import FP8, FP8_CODE, FULL, VALID_BITS, KVFormat  # noqa: F401  (re-exported)

ALIGN = 16


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN




def values_channel_major(bits: int) -> bool:
    """Whether value codes of this width are stored channel-major (``[H, D, T * bits / 8]``)
    instead of token-major (``[H, T, D * bits / 8]``); see the module docstring."""
    return bits == 8


def meta_dtype_for(store_dtype: torch.dtype) -> torch.dtype:
    """Scales/zeros: fp32 beside an fp32 store, fp16 beside 16-bit stores."""
    return torch.float32 if store_dtype == torch.float32 else torch.float16


@dataclass(frozen=True)
class BlockGeometry:
    """Shape of one block in one layer: T tokens, H kv heads, D head dim."""

    block_size: int
    num_kv_heads: int
    head_dim: int
    store_dtype: torch.dtype
    value_group: int = 32

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.head_dim % 8:
            raise ValueError(f"head_dim must be a multiple of 8, got {self.head_dim}")
        if self.head_dim % self.value_group:
            raise ValueError(
                f"value_group {self.value_group} must divide head_dim {self.head_dim}")

    @cached_property
    def meta_dtype(self) -> torch.dtype:
        return meta_dtype_for(self.store_dtype)

    @cached_property
    def store_elem(self) -> int:
        return torch.tensor([], dtype=self.store_dtype).element_size()

    @cached_property
    def meta_elem(self) -> int:
        return torch.tensor([], dtype=self.meta_dtype).element_size()

    @cached_property
    def _memo(self) -> dict:
        return {}

    def sections(self, fmt: KVFormat) -> dict[str, tuple[int, int]]:
        """Name -> (byte offset in slot, byte length) of each section of a slot.

        Memoized per geometry: this sits on the decode path and under every block's
        byte count (an lru_cache keyed on the geometry hashed all its fields per call:
        ~5 us, 48,000 calls a snapshot at 64 sequences)."""
        memo = self._memo
        out = memo.get(fmt)
        if out is None:
            out = memo[fmt] = self._compute_sections(fmt)
        return out

    def _compute_sections(self, fmt: KVFormat) -> dict[str, tuple[int, int]]:
        T, H, D, G = self.block_size, self.num_kv_heads, self.head_dim, self.value_group
        out: dict[str, tuple[int, int]] = {}
        off = 0

        def put(name: str, nbytes: int) -> None:
            nonlocal off
            out[name] = (off, nbytes)
            off = _align(off + nbytes)

        if fmt.k_bits == 0:
            put("k", H * T * D * self.store_elem)
        elif fmt.k_fp8:
            put("k_codes", H * T * D)
            put("k_scale", H * self.meta_elem)
        else:
            put("k_codes", H * T * D * fmt.k_bits // 8)
            put("k_scale", H * D * self.meta_elem)
            put("k_zero", H * D * self.meta_elem)
        if fmt.v_bits == 0:
            put("v", H * T * D * self.store_elem)
        elif fmt.v_fp8:
            put("v_codes", H * T * D)
            put("v_scale", H * self.meta_elem)
        else:
            put("v_codes", H * T * D * fmt.v_bits // 8)
            put("v_scale", H * T * (D // G) * self.meta_elem)
            put("v_zero", H * T * (D // G) * self.meta_elem)
        out["_total"] = (0, off)
        return out

    def slot_bytes(self, fmt: KVFormat) -> int:
        """Bytes of one block in one layer, alignment padding included."""
        return self.sections(fmt)["_total"][1]
