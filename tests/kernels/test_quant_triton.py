"""Triton block quantize/dequantize vs the torch references; reference round-trip bounds."""
from __future__ import annotations

import pytest
import torch

from engine.kernels.quant import (REFINED_BITS, dequantize_keys_ref, dequantize_values_ref,
                                  fit_groups, key_weights, pack_codes, quantize_keys_ref,
                                  quantize_values_ref, unpack_codes)
from kernel_cases import DEVICES, kernel_modules, seed_of

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


def _close_fit(x, got, want, bits, keys, G=None, anchor=None):
    """Kernel vs reference fit. Min/max fits (8, 4 bits) are deterministic: scale/zero
    bit-equal, codes within one step. Refined fits (2 bits) choose between candidates by
    their error, and a different summation order may tip a near-tie (or a scale's
    rounding to the meta dtype) onto another path of the least-squares steps. So: most
    groups agree with the reference; every group's error is at most min/max's (what the
    method guarantees; anchored blocks excepted); the total error is the reference's
    within 3%; codes are the nearest ones for the kernel's own scale/zero."""
    c, s, z = got
    rc, rs, rz = want
    assert c.shape == rc.shape and c.dtype == torch.uint8
    assert s.dtype == rs.dtype and s.shape == rs.shape and z.shape == rz.shape
    if bits not in REFINED_BITS:
        torch.testing.assert_close(s.cpu(), rs, atol=0, rtol=0)
        torch.testing.assert_close(z.cpu(), rz, atol=0, rtol=0)
        _close_codes(c, rc, bits)
        return
    e_got = _group_sse(x, c, s, z, bits, keys, G)
    e_want = _group_sse(x, rc, rs, rz, bits, keys, G)
    e_mm = _minmax_sse(x, bits, keys, G)
    span = float(x.float().amax() - x.float().amin())
    free = torch.ones_like(e_got, dtype=torch.bool)
    if anchor is not None:
        free[anchor.cpu()] = False
    slack = 1e-4 * e_mm + 1e-6 * span ** 2
    assert (e_got <= e_mm + slack)[free].all(), "a group's error is above min/max's"
    assert (e_want <= e_mm + slack)[free].all(), "reference: a group's error above min/max's"
    assert abs(float(e_got.sum() / e_want.sum().clamp_min(1e-30)) - 1) < 3e-2
    same = torch.isclose(s.cpu().float(), rs.float(), rtol=1e-3, atol=1e-6) & \
        torch.isclose(z.cpu().float(), rz.float(), rtol=1e-3, atol=1e-4 * span)
    assert same.float().mean() >= 0.8, f"only {float(same.float().mean()):.2f} of groups agree"
    recode = quantize_codes_for(x, s, z, bits, keys=keys, G=G)
    _close_codes(c, recode, bits)


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


def _dequant_matches(qt, device, got, bits, dtype, keys, G=None):
    c, s, z = (t.cpu() for t in got)
    if keys:
        out = qt.dequantize_keys_triton(c.to(device), s.to(device), z.to(device), bits, dtype)
        want = dequantize_keys_ref(c, s, z, bits, dtype)
    else:
        out = qt.dequantize_values_triton(c.to(device), s.to(device), z.to(device), bits, G,
                                          dtype)
        want = dequantize_values_ref(c, s, z, bits, G, dtype)
    _close_dequant(out, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_keys_matches_reference(request, device, shape, bits, dtype):
    _, qt = kernel_modules(device)
    x = _blocks(shape, dtype, seed_of(request), device)
    md = _meta(dtype)
    got = qt.quantize_keys_triton(x, bits, md)
    _close_fit(x, got, quantize_keys_ref(x.cpu(), bits, md), bits, keys=True)
    _dequant_matches(qt, device, got, bits, dtype, keys=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_quantize_keys_with_anchor_matches_reference(request, device, shape, bits, dtype):
    """Blocks flagged as holding the sequence's first token (the attention sink)."""
    _, qt = kernel_modules(device)
    x = _blocks(shape, dtype, seed_of(request), device)
    gen = torch.Generator().manual_seed(seed_of(request) + 1)
    anchor = torch.rand(shape[0], generator=gen) < 0.5
    anchor[0] = True
    md = _meta(dtype)
    got = qt.quantize_keys_triton(x, bits, md, anchor=anchor.to(device))
    want = quantize_keys_ref(x.cpu(), bits, md, anchor=anchor)
    _close_fit(x, got, want, bits, keys=True, anchor=anchor)
    if bits in REFINED_BITS:
        # token 0 of anchored blocks sits on the grid (up to the meta dtype's rounding)
        k0 = dequantize_keys_ref(*(t.cpu() for t in got), bits, torch.float32)[anchor, :, 0]
        x0 = x.cpu().float()[anchor, :, 0]
        eps = 1e-5 if md == torch.float32 else 2e-3
        assert ((k0 - x0).abs() <= eps * (1 + x.cpu().float().abs().amax())).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_values_matches_reference(request, device, shape, bits, dtype):
    _, qt = kernel_modules(device)
    G = shape[-1]
    x = _blocks(shape, dtype, seed_of(request), device)
    md = _meta(dtype)
    got = qt.quantize_values_triton(x, bits, G, md)
    _close_fit(x, got, quantize_values_ref(x.cpu(), bits, G, md), bits, keys=False, G=G)
    _dequant_matches(qt, device, got, bits, dtype, keys=False, G=G)


def test_quant_rejects_bad_inputs():
    _, qt = kernel_modules("cpu")
    x = torch.randn(1, 2, 16, 32)
    with pytest.raises(ValueError, match="bits"):
        qt.quantize_keys_triton(x, 3, torch.float32)
    with pytest.raises(ValueError, match="N, H, T, D"):
        qt.quantize_keys_triton(x[0], 4, torch.float32)
    with pytest.raises(ValueError, match="group"):
        qt.quantize_values_triton(torch.randn(1, 2, 16, 48), 4, 24, torch.float32)
    with pytest.raises(ValueError, match="anchor"):
        qt.quantize_keys_triton(x.expand(3, -1, -1, -1).contiguous(), 2,
                                torch.float32, anchor=torch.ones(2, dtype=torch.bool))


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
