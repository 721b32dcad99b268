"""Triton block quantize/dequantize vs the torch references; reference round-trip bounds."""
from __future__ import annotations

import pytest
import torch

from engine.kernels.quant import (dequantize_keys_ref, dequantize_values_ref, pack_codes,
                                  quantize_keys_ref, quantize_values_ref, unpack_codes)
from kernel_cases import DEVICES, kernel_modules, seed_of

# (N, H, T, D, G): odd block counts and token counts, small heads
SHAPES = [(1, 1, 16, 16, 8), (3, 2, 16, 32, 16), (2, 3, 17, 64, 32), (5, 2, 32, 128, 32),
          (1, 2, 7, 32, 32)]
BITS = [8, 4, 2]
DTYPES = [torch.float32, torch.float16]


def _meta(dtype):
    return torch.float32 if dtype == torch.float32 else torch.float16


def _blocks(shape, dtype, seed, device):
    N, H, T, D, _ = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, T, D, generator=gen) * 2
    x[..., int(torch.randint(D, (1,), generator=gen))] *= 9          # outlier channel
    x[0, 0, :, 0] = 0.5                                               # constant channel
    return x.to(dtype).to(device)


def _close_dequant(got, want):
    """code * scale + zero: the GPU fuses it (one rounding, torch rounds twice), so allow
    a few ulps of the largest term, not of the (possibly cancelled) result."""
    tol = 4e-7 * (1 + float(want.float().abs().max()))
    torch.testing.assert_close(got.cpu().float(), want.float(), atol=tol, rtol=1e-5)


def _close_codes(got, want, bits):
    """Codes equal up to one step (rounding ties differ between Triton and torch.round)."""
    g, w = unpack_codes(got.cpu(), bits), unpack_codes(want.cpu(), bits)
    diff = (g - w).abs()
    assert diff.max() <= 1, f"codes differ by {diff.max()}"
    assert (diff > 0).float().mean() < 0.01, "too many codes off by one"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_keys_matches_reference(request, device, shape, bits, dtype):
    _, qt = kernel_modules(device)
    x = _blocks(shape, dtype, seed_of(request), device)
    md = _meta(dtype)
    c, s, z = qt.quantize_keys_triton(x, bits, md)
    rc, rs, rz = quantize_keys_ref(x.cpu(), bits, md)
    assert c.shape == rc.shape and c.dtype == torch.uint8
    assert s.dtype == md and s.shape == rs.shape and z.shape == rz.shape
    torch.testing.assert_close(s.cpu(), rs, atol=0, rtol=0)
    torch.testing.assert_close(z.cpu(), rz, atol=0, rtol=0)
    _close_codes(c, rc, bits)
    out = qt.dequantize_keys_triton(rc.to(device), rs.to(device), rz.to(device), bits, dtype)
    want = dequantize_keys_ref(rc, rs, rz, bits, dtype)
    _close_dequant(out, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_values_matches_reference(request, device, shape, bits, dtype):
    _, qt = kernel_modules(device)
    G = shape[-1]
    x = _blocks(shape, dtype, seed_of(request), device)
    md = _meta(dtype)
    c, s, z = qt.quantize_values_triton(x, bits, G, md)
    rc, rs, rz = quantize_values_ref(x.cpu(), bits, G, md)
    assert c.shape == rc.shape and s.shape == rs.shape and s.dtype == md
    torch.testing.assert_close(s.cpu(), rs, atol=0, rtol=0)
    torch.testing.assert_close(z.cpu(), rz, atol=0, rtol=0)
    _close_codes(c, rc, bits)
    out = qt.dequantize_values_triton(rc.to(device), rs.to(device), rz.to(device), bits, G, dtype)
    want = dequantize_values_ref(rc, rs, rz, bits, G, dtype)
    _close_dequant(out, want)


def test_quant_rejects_bad_inputs():
    _, qt = kernel_modules("cpu")
    x = torch.randn(1, 2, 16, 32)
    with pytest.raises(ValueError, match="bits"):
        qt.quantize_keys_triton(x, 3, torch.float32)
    with pytest.raises(ValueError, match="N, H, T, D"):
        qt.quantize_keys_triton(x[0], 4, torch.float32)
    with pytest.raises(ValueError, match="group"):
        qt.quantize_values_triton(torch.randn(1, 2, 16, 48), 4, 24, torch.float32)


# ---- the references themselves ------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_roundtrip(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 32), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 5, 32 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes.to(torch.int32))
    if bits == 4:  # layout.py: channel d in byte d // 2 at bit (d % 2) * 4, low bits first
        assert int(packed[0, 0, 0]) == int(codes[0, 0, 0]) | int(codes[0, 0, 1]) << 4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=str)
def test_reference_roundtrip_error_bound(request, shape, bits, dtype):
    """|x - dequant(quant(x))| <= scale / 2 per element (plus meta/store rounding)."""
    G = shape[-1]
    x = _blocks(shape, dtype, seed_of(request), "cpu")
    md = _meta(dtype)
    eps = 1e-6 if dtype == torch.float32 else 2e-3     # rounding of zero and of the output
    c, s, z = quantize_keys_ref(x, bits, md)
    err = (dequantize_keys_ref(c, s, z, bits, torch.float32) - x.float()).abs()
    bound = s.float().unsqueeze(2) / 2 + eps * (1 + x.float().abs())
    assert (err <= bound).all(), float((err - bound).max())
    c, s, z = quantize_values_ref(x, bits, G, md)
    err = (dequantize_values_ref(c, s, z, bits, G, torch.float32) - x.float()).abs()
    N, H, T, D = x.shape
    sc = s.float().unsqueeze(-1).expand(N, H, T, D // G, G).reshape(N, H, T, D)
    bound = sc / 2 + eps * (1 + x.float().abs())
    assert (err <= bound).all(), float((err - bound).max())
    if bits == 8:  # int8: tiny error relative to the value range
        rng = x.float().amax() - x.float().amin()
        assert err.max() <= rng / 255 * 0.5 + eps * (1 + x.float().abs().max())
