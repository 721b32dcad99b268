"""Read and write whole KV blocks in arena slots (torch; runs on any device).

``arena`` is uint8 ``[..., bytes]``: one layer's row ``[bytes]`` or all layers
``[L, bytes]``. Offsets are slot byte offsets (same in every layer). Dense blocks are
``[..., N, H, T, D]`` with the arena's leading dims first.
"""
from __future__ import annotations

import torch

from engine.layout import BlockGeometry, KVFormat, values_channel_major
from engine.kernels.quant import (dequantize_fp8_ref, dequantize_keys_ref,
                                  dequantize_values_ref, quantize_fp8_ref, quantize_keys_ref,
                                  quantize_values_ref)


def _elems(arena: torch.Tensor, dtype: torch.dtype, offsets: torch.Tensor, sec_off: int,
           nbytes: int) -> torch.Tensor:
    """Gather ``nbytes`` from ``offsets + sec_off`` as ``dtype``: [..., N, nbytes/elem]."""
    esize = torch.tensor([], dtype=dtype).element_size()
    typed = arena.view(dtype)
    n = nbytes // esize
    idx = (offsets + sec_off) // esize
    if typed.dim() == 1:  # zero-copy window view, then one row gather
        return typed.unfold(0, n, 1).index_select(0, idx)
    # [L, bytes]: unfold + index_select would materialize the windows; index directly
    return typed[..., idx.unsqueeze(-1) + torch.arange(n, device=idx.device)]


def _put(arena: torch.Tensor, dtype: torch.dtype, offsets: torch.Tensor, sec_off: int,
         values: torch.Tensor) -> None:
    """Scatter ``values [..., N, n]`` (as dtype) to ``offsets + sec_off``."""
    esize = torch.tensor([], dtype=dtype).element_size()
    typed = arena.view(dtype)
    n = values.shape[-1]
    idx = ((offsets + sec_off) // esize).unsqueeze(-1) + torch.arange(n, device=offsets.device)
    typed.index_copy_(-1, idx.reshape(-1), values.to(dtype).reshape(*values.shape[:-2], -1))


def value_codes_to_slot(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Value codes ``[..., T, D * bits / 8]`` (token-major, as quantize_values_ref makes
    them) -> the slot's byte order (channel-major ``[..., D, T]`` for 8 bits)."""
    return codes.transpose(-1, -2) if values_channel_major(bits) else codes


def value_codes_from_slot(raw: torch.Tensor, T: int, bits: int) -> torch.Tensor:
    """A slot's value code bytes ``[..., T * D * bits / 8]`` -> ``[..., T, D * bits / 8]``."""
    n = raw.shape[-1] // T
    if values_channel_major(bits):
        return raw.reshape(*raw.shape[:-1], n, T).transpose(-1, -2)
    return raw.reshape(*raw.shape[:-1], T, n)


def read_blocks(arena: torch.Tensor, offsets: torch.Tensor, geom: BlockGeometry,
                fmt: KVFormat, out_dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of one format -> dense (dequantized) k, v ``[..., N, H, T, D]``."""
    out_dtype = out_dtype or geom.store_dtype
    H, T, D, G = geom.num_kv_heads, geom.block_size, geom.head_dim, geom.value_group
    lead = arena.shape[:-1]
    N = offsets.numel()
    s = geom.sections(fmt)
    md = geom.meta_dtype

    def sec(name: str, dtype: torch.dtype) -> torch.Tensor:
        off, nbytes = s[name]
        return _elems(arena, dtype, offsets, off, nbytes)

    if fmt.k_bits == 0:
        k = sec("k", geom.store_dtype).reshape(*lead, N, H, T, D).to(out_dtype)
    elif fmt.k_fp8:
        k = dequantize_fp8_ref(sec("k_codes", torch.uint8).reshape(-1, H, T, D),
                               sec("k_scale", md).reshape(-1, H), out_dtype)
        k = k.reshape(*lead, N, H, T, D)
    else:
        codes = sec("k_codes", torch.uint8).reshape(-1, H, T, D * fmt.k_bits // 8)
        k = dequantize_keys_ref(codes, sec("k_scale", md).reshape(-1, H, D),
                                sec("k_zero", md).reshape(-1, H, D), fmt.k_bits, out_dtype)
        k = k.reshape(*lead, N, H, T, D)
    if fmt.v_bits == 0:
        v = sec("v", geom.store_dtype).reshape(*lead, N, H, T, D).to(out_dtype)
    elif fmt.v_fp8:
        raw = sec("v_codes", torch.uint8).reshape(-1, H, T * D)
        v = dequantize_fp8_ref(value_codes_from_slot(raw, T, 8),
                               sec("v_scale", md).reshape(-1, H), out_dtype)
        v = v.reshape(*lead, N, H, T, D)
    else:
        raw = sec("v_codes", torch.uint8).reshape(-1, H, T * D * fmt.v_bits // 8)
        codes = value_codes_from_slot(raw, T, fmt.v_bits)
        v = dequantize_values_ref(codes, sec("v_scale", md).reshape(-1, H, T, D // G),
                                  sec("v_zero", md).reshape(-1, H, T, D // G),
                                  fmt.v_bits, G, out_dtype)
        v = v.reshape(*lead, N, H, T, D)
    return k, v


def write_blocks(arena: torch.Tensor, offsets: torch.Tensor, geom: BlockGeometry,
                 fmt: KVFormat, k: torch.Tensor, v: torch.Tensor,
                 anchor: torch.Tensor | None = None) -> None:
    """Dense k, v ``[..., N, H, T, D]`` -> slots of format ``fmt`` (quantizing).

    ``anchor``: [N] bool, blocks that hold their sequence's first token (the attention
    sink): their keys are quantized with token 0 on the grid (engine/kernels/quant.py)."""
    H, T, D, G = geom.num_kv_heads, geom.block_size, geom.head_dim, geom.value_group
    lead = arena.shape[:-1]
    N = offsets.numel()
    s = geom.sections(fmt)
    md = geom.meta_dtype
    flat = lambda x: x.reshape(*lead, N, -1)  # noqa: E731
    if fmt.k_bits == 0:
        _put(arena, geom.store_dtype, offsets, s["k"][0], flat(k))
    elif fmt.k_fp8:
        c, sc = quantize_fp8_ref(k.reshape(-1, H, T, D), md)
        _put(arena, torch.uint8, offsets, s["k_codes"][0], flat(c))
        _put(arena, md, offsets, s["k_scale"][0], flat(sc))
    else:
        if anchor is not None:   # one flag per block, repeated over the leading dims
            anchor = anchor.to(device=k.device, dtype=torch.bool).reshape(1, N)
            anchor = anchor.expand(max(1, k.numel() // (N * H * T * D)), N).reshape(-1)
        c, sc, z = quantize_keys_ref(k.reshape(-1, H, T, D), fmt.k_bits, md, anchor)
        _put(arena, torch.uint8, offsets, s["k_codes"][0], flat(c))
        _put(arena, md, offsets, s["k_scale"][0], flat(sc))
        _put(arena, md, offsets, s["k_zero"][0], flat(z))
    if fmt.v_bits == 0:
        _put(arena, geom.store_dtype, offsets, s["v"][0], flat(v))
    elif fmt.v_fp8:
        c, sc = quantize_fp8_ref(v.reshape(-1, H, T, D), md)
        _put(arena, torch.uint8, offsets, s["v_codes"][0], flat(value_codes_to_slot(c, 8)))
        _put(arena, md, offsets, s["v_scale"][0], flat(sc))
    else:
        c, sc, z = quantize_values_ref(v.reshape(-1, H, T, D), fmt.v_bits, G, md)
        _put(arena, torch.uint8, offsets, s["v_codes"][0],
             flat(value_codes_to_slot(c, fmt.v_bits)))
        _put(arena, md, offsets, s["v_scale"][0], flat(sc))
        _put(arena, md, offsets, s["v_zero"][0], flat(z))
