"""The slot codec (engine/kernels/slots.py): byte layout of quantized blocks, round trips."""
from __future__ import annotations

import pytest
import torch

from engine.kernels.quant import (quantize_fp8_ref, quantize_keys_ref, quantize_values_ref,
                                  unpack_codes)
from engine.kernels.slots import read_blocks, write_blocks
from engine.layout import BlockGeometry, KVFormat, values_channel_major
from kernel_cases import seed_of

# (T, H, D, G, store dtype): odd-ish head counts, both meta widths
GEOMS = [(16, 3, 32, 16, torch.float16), (32, 2, 64, 32, torch.float32), (16, 1, 16, 8,
                                                                          torch.bfloat16)]
FORMATS = [KVFormat(8, 8), KVFormat(4, 4), KVFormat(2, 2), KVFormat(4, 8), KVFormat(8, 2),
           KVFormat(0, 8), KVFormat(8, 0), KVFormat(8, 8, fp8=True), KVFormat(8, 4, fp8=True),
           KVFormat(2, 8, fp8=True), KVFormat(0, 8, fp8=True)]


def _blocks(geom, n, gen):
    shape = (n, geom.num_kv_heads, geom.block_size, geom.head_dim)
    return (torch.randn(shape, generator=gen).to(geom.store_dtype),
            torch.randn(shape, generator=gen).to(geom.store_dtype))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("g", GEOMS, ids=lambda g: f"T{g[0]}H{g[1]}D{g[2]}G{g[3]}-{g[4]}")
def test_value_codes_layout_in_slot(request, g, fmt):
    """8-bit value codes (int8 and fp8) sit channel-major ([H, D, T]) in the slot, narrower
    ones token-major ([H, T, D * bits / 8]); keys always token-major. Checked byte for byte
    against the quantizer's own codes (and fp8's one scale per kv head)."""
    T, H, D, G, dt = g
    geom = BlockGeometry(T, H, D, dt, value_group=G)
    gen = torch.Generator().manual_seed(seed_of(request))
    n = 3
    k, v = _blocks(geom, n, gen)
    slot = geom.slot_bytes(fmt)
    arena = torch.zeros((n + 2) * slot, dtype=torch.uint8)
    offs = torch.tensor([4, 1, 2], dtype=torch.int64) * slot
    write_blocks(arena, offs, geom, fmt, k, v)
    sec = geom.sections(fmt)
    for i, o in enumerate(offs.tolist()):
        if fmt.v_fp8:
            start, nbytes = sec["v_codes"]
            c, sc = quantize_fp8_ref(v[i:i + 1], geom.meta_dtype)
            want = c[0].transpose(-1, -2)                                     # [H, D, T]
            assert torch.equal(arena[o + start:o + start + nbytes], want.reshape(-1))
            start, nbytes = sec["v_scale"]
            assert torch.equal(arena[o + start:o + start + nbytes].view(geom.meta_dtype), sc[0])
        elif fmt.v_bits:
            start, nbytes = sec["v_codes"]
            got = arena[o + start:o + start + nbytes]
            c = quantize_values_ref(v[i:i + 1], fmt.v_bits, G, geom.meta_dtype)[0][0]
            if values_channel_major(fmt.v_bits):
                assert fmt.v_bits == 8
                want = unpack_codes(c, 8).to(torch.uint8).transpose(-1, -2)   # [H, D, T]
            else:
                want = c                                                      # [H, T, D*b/8]
            assert torch.equal(got, want.reshape(-1))
        if fmt.k_fp8:
            start, nbytes = sec["k_codes"]
            c, sc = quantize_fp8_ref(k[i:i + 1], geom.meta_dtype)             # [H, T, D]
            assert torch.equal(arena[o + start:o + start + nbytes], c.reshape(-1))
            start, nbytes = sec["k_scale"]
            assert torch.equal(arena[o + start:o + start + nbytes].view(geom.meta_dtype), sc[0])
        elif fmt.k_bits:
            start, nbytes = sec["k_codes"]
            c = quantize_keys_ref(k[i:i + 1], fmt.k_bits, geom.meta_dtype)[0][0]
            assert torch.equal(arena[o + start:o + start + nbytes], c.reshape(-1))
    assert values_channel_major(8) and not values_channel_major(4) \
        and not values_channel_major(2)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("g", GEOMS, ids=lambda g: f"T{g[0]}H{g[1]}D{g[2]}G{g[3]}-{g[4]}")
def test_write_then_read_dequantizes_the_quantizer_codes(request, g, fmt):
    """read_blocks(write_blocks(x)) is the quantizer's own dequantization of x (whatever
    the byte order in the slot), and full-precision halves come back exactly."""
    from engine.kernels.quant import (dequantize_fp8_ref, dequantize_keys_ref,
                                      dequantize_values_ref)
    T, H, D, G, dt = g
    geom = BlockGeometry(T, H, D, dt, value_group=G)
    gen = torch.Generator().manual_seed(seed_of(request))
    k, v = _blocks(geom, 2, gen)
    slot = geom.slot_bytes(fmt)
    arena = torch.zeros(3 * slot, dtype=torch.uint8)
    offs = torch.tensor([2, 0], dtype=torch.int64) * slot
    write_blocks(arena, offs, geom, fmt, k, v)
    k2, v2 = read_blocks(arena, offs, geom, fmt, torch.float32)
    md = geom.meta_dtype
    if fmt.k_fp8:
        wk = dequantize_fp8_ref(*quantize_fp8_ref(k, md), torch.float32)
    else:
        wk = k.float() if not fmt.k_bits else dequantize_keys_ref(
            *quantize_keys_ref(k, fmt.k_bits, md), fmt.k_bits, torch.float32)
    if fmt.v_fp8:
        wv = dequantize_fp8_ref(*quantize_fp8_ref(v, md), torch.float32)
    else:
        wv = v.float() if not fmt.v_bits else dequantize_values_ref(
            *quantize_values_ref(v, fmt.v_bits, G, md), fmt.v_bits, G, torch.float32)
    assert torch.equal(k2, wk) and torch.equal(v2, wv)


@pytest.mark.parametrize("g", GEOMS, ids=lambda g: f"T{g[0]}H{g[1]}D{g[2]}G{g[3]}-{g[4]}")
def test_fp8_slot_sections(g):
    """An fp8 side is its e4m3 codes (a byte an element) and one scale per kv head, no
    zero; it is smaller than int8's (whose meta is per channel / token group)."""
    T, H, D, G, dt = g
    geom = BlockGeometry(T, H, D, dt, value_group=G)
    fp8, int8 = KVFormat(8, 8, fp8=True), KVFormat(8, 8)
    sec = geom.sections(fp8)
    assert set(sec) == {"k_codes", "k_scale", "v_codes", "v_scale", "_total"}
    assert sec["k_codes"][1] == sec["v_codes"][1] == H * T * D
    assert sec["k_scale"][1] == sec["v_scale"][1] == H * geom.meta_elem
    assert all(off % 16 == 0 for off, _ in sec.values())
    assert geom.slot_bytes(fp8) < geom.slot_bytes(int8)
