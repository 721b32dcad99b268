"""The torch quantizers (engine/kernels/quant.py): round-trip bounds, refined fits, fp8.

They are the product's quantize path on every device (engine/moves.py) and the oracle of
the decode kernel's tests."""
from __future__ import annotations

import pytest
import torch

from engine.kernels.quant import (FP8_MAX, REFINED_BITS, dequantize_fp8_ref,
                                  dequantize_keys_ref, dequantize_values_ref, fit_groups,
                                  key_weights, pack_codes, quantize_fp8_ref, quantize_keys_ref,
                                  quantize_values_ref, unpack_codes)
from kernel_cases import seed_of

# (N, H, T, D, G): odd block counts and token counts, small heads
SHAPES = [(1, 1, 16, 16, 8), (3, 2, 16, 32, 16), (2, 3, 17, 64, 32), (5, 2, 32, 128, 32),
          (1, 2, 7, 32, 32), (3, 1, 33, 8, 8), (4, 3, 31, 64, 16)]
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


def _key_w(x, bits):
    """The key fit's weights [N, H, T, D] (1 where the fit is unweighted)."""
    if bits not in REFINED_BITS:
        return torch.ones_like(x.cpu().float())
    return key_weights(x.cpu().float().transpose(2, 3)).transpose(2, 3)


def _group_sse(x, c, s, z, bits, keys, G=None):
    """(Weighted, as the fit weighs it) squared reconstruction error per quantization
    group: keys [N, H, D] (over T), values [N, H, T, D/G]."""
    if keys:
        e = dequantize_keys_ref(c.cpu(), s.cpu(), z.cpu(), bits, torch.float32) - x.cpu().float()
        return (_key_w(x, bits) * e * e).sum(2)
    e = dequantize_values_ref(c.cpu(), s.cpu(), z.cpu(), bits, G, torch.float32) - x.cpu().float()
    N, H, T, D = e.shape
    return (e * e).reshape(N, H, T, D // G, G).sum(-1)


def _minmax_sse(x, bits, keys, G=None):
    """Per-group squared error of the plain min/max fit (reference)."""
    md = torch.float32 if x.dtype == torch.float32 else torch.float16
    xf = x.cpu().float()
    if keys:
        g = xf.transpose(2, 3)                                            # [N, H, D, T]
        w = _key_w(x, bits).transpose(2, 3)
    else:
        N, H, T, D = xf.shape
        g = xf.reshape(N, H, T, D // G, G)
        w = torch.ones_like(g)
    c, s, z = fit_groups(g, bits, md)
    return (w * (c * s + z - g) ** 2).sum(-1)


def quantize_codes_for(x, s, z, bits, keys, G=None):
    """Nearest codes of x for a given scale/zero (packed), torch."""
    qmax = (1 << bits) - 1
    xf = x.cpu().float()
    if keys:
        sf, zf = s.cpu().float().unsqueeze(2), z.cpu().float().unsqueeze(2)
    else:
        N, H, T, D = x.shape
        sf = s.cpu().float().unsqueeze(-1).expand(N, H, T, D // G, G).reshape(N, H, T, D)
        zf = z.cpu().float().unsqueeze(-1).expand(N, H, T, D // G, G).reshape(N, H, T, D)
    c = torch.round((xf - zf) / torch.where(sf > 0, sf, torch.ones_like(sf))).clamp(0, qmax)
    return pack_codes(c.to(torch.uint8), bits)



@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_roundtrip(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 32), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 5, 32 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes.to(torch.int32))
    if bits == 4:  # layout.py: channel d in byte d // 2 at bit (d % 2) * 4, low bits first
        assert int(packed[0, 0, 0]) == int(codes[0, 0, 0]) | int(codes[0, 0, 1]) << 4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [b for b in BITS if b not in REFINED_BITS])
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=str)
def test_reference_roundtrip_error_bound(request, shape, bits, dtype):
    """Min/max fits: |x - dequant(quant(x))| <= scale / 2 per element (plus meta/store
    rounding)."""
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", REFINED_BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_refined_fit_beats_minmax(request, shape, bits, dtype):
    """Refined fits: no group's (weighted, for keys) error above min/max's, the total
    clearly below it on Gaussian data (an outlier channel included), and codes nearest for
    the stored meta.
    Anchored key blocks: token 0 on the grid, nothing clipped (|err| <= scale / 2)."""
    G = shape[-1]
    x = _blocks(shape, dtype, seed_of(request), "cpu")
    md = _meta(dtype)
    eps = 1e-6 if dtype == torch.float32 else 2e-3
    for keys in (True, False):
        got = quantize_keys_ref(x, bits, md) if keys else quantize_values_ref(x, bits, G, md)
        e, mm = _group_sse(x, *got, bits, keys, G), _minmax_sse(x, bits, keys, G)
        assert (e <= mm * (1 + 1e-5) + 1e-9).all()
        if x.shape[2] >= 16 or not keys:   # groups long enough to have slack
            assert e.sum() < 0.9 * mm.sum(), (keys, float(e.sum() / mm.sum()))
        assert torch.equal(unpack_codes(got[0], bits),
                           unpack_codes(quantize_codes_for(x, got[1], got[2], bits, keys, G),
                                        bits))
    anchor = torch.zeros(shape[0], dtype=torch.bool)
    anchor[0] = True
    c, s, z = quantize_keys_ref(x, bits, md, anchor=anchor)
    err = (dequantize_keys_ref(c, s, z, bits, torch.float32) - x.float())[0]   # [H, T, D]
    assert (err[:, 0].abs() <= eps * (1 + x.float().abs().amax())).all()
    assert (err.abs() <= s[0].float().unsqueeze(1) / 2 + eps * (1 + x.float().abs()[0])).all()
    c2, s2, z2 = quantize_keys_ref(x, bits, md)        # other blocks: unaffected by anchor
    assert torch.equal(c[1:], c2[1:]) and torch.equal(s[1:], s2[1:])


# ---- fp8 (e4m3, one scale per block and kv head) -------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp8_roundtrip_error_bound(request, shape, dtype):
    """|x - dequant(quant(x))| <= half an e4m3 step: 2^-4 of |x| for normal values, half
    the smallest subnormal (2^-10 scale) near zero; the largest |x| of a tile maps to
    +-448 (the whole range is used); codes never NaN (0x7F / 0xFF)."""
    x = _blocks(shape, dtype, seed_of(request), "cpu")
    md = _meta(dtype)
    c, s = quantize_fp8_ref(x, md)
    N, H, T, D, _ = shape
    assert c.shape == (N, H, T, D) and c.dtype == torch.uint8
    assert s.shape == (N, H) and s.dtype == md
    assert not ((c & 0x7F) == 0x7F).any()
    y = dequantize_fp8_ref(c, s, torch.float32)
    xf, sf = x.float(), s.float()[:, :, None, None]
    err = (y - xf).abs()
    bound = xf.abs() * 2.0 ** -4 + sf * 2.0 ** -10 + 1e-7
    assert (err <= bound).all(), float((err - bound).max())
    peak = c.view(torch.float8_e4m3fn).float().abs().amax(dim=(2, 3))
    assert (peak >= FP8_MAX * (1 - 2.0 ** -4)).all()
    assert torch.equal(dequantize_fp8_ref(c, s, dtype), y.to(dtype))


def test_fp8_zero_tile_and_saturation():
    """An all-zero tile: scale 0, codes 0, dequantized 0. A scale rounded down to the meta
    dtype would put the tile's maximum past 448: it saturates instead of becoming NaN."""
    x = torch.zeros(2, 2, 16, 32)
    big = 448 * (1 + 0.4 / 1024)                  # big / 448 rounds down to 1.0 in fp16
    x[1, 1, 3, 5] = big
    c, s = quantize_fp8_ref(x, torch.float16)
    assert float(s[0, 0]) == 0 and not c[0].any()
    assert float(s[1, 1]) * FP8_MAX < big
    y = dequantize_fp8_ref(c, s, torch.float32)
    assert float(c[1, 1, 3, 5].view(torch.float8_e4m3fn).float()) == FP8_MAX
    assert torch.isfinite(y).all() and abs(float(y[1, 1, 3, 5]) - big) < big * 2 ** -10
    assert (y[0] == 0).all()


def test_fp8_error_below_int4_and_above_int8_on_keys(request):
    """What the precision ranking of formats (KVFormat.precision_rank) rests on: on keys
    with an outlier channel, fp8's error sits between int8's and int4's."""
    x = _blocks((8, 2, 32, 64, 32), torch.float32, seed_of(request), "cpu")

    def mse(y):
        return float(((y - x) ** 2).mean())
    e8 = mse(dequantize_keys_ref(*quantize_keys_ref(x, 8, torch.float32), 8, torch.float32))
    e4 = mse(dequantize_keys_ref(*quantize_keys_ref(x, 4, torch.float32), 4, torch.float32))
    ef = mse(dequantize_fp8_ref(*quantize_fp8_ref(x, torch.float32), torch.float32))
    assert e8 < ef < e4
