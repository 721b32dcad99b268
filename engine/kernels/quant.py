"""Block quantization (KIVI, Liu et al. 2024): keys per channel, values per token.

Asymmetric codes: ``x ~ code * scale + zero``, ``code = clamp(round((x - zero) / scale),
0, 2^bits - 1)``. Scale and zero are rounded to the meta dtype *before* codes are
computed, so that dequantization with the stored meta is the exact inverse the codes
were made for. Codes pack ``8 // bits`` channels per byte, low bits first (see
engine/layout.py).

How scale and zero are chosen (the layout is the same either way):

* 8 and 4 bits: the group's min/max, ``scale = (max - min) / (2^bits - 1)``, ``zero = min``.
* 2 bits, where min/max wastes most of the 4 levels on the group's extremes:
  - values: the best of a grid of clipped ranges (each end moved in by 0, 5%, ..., 30% of
    the range; least squared error), then ``LS_ITERS`` alternating least-squares steps
    (codes fixed: scale/zero are the linear fit of x on the codes; then re-round). Each
    step is kept only where it lowers the group's squared error.
  - keys: the same clip grid and least-squares steps, but on a *weighted* squared error:
    a token weighs ``0.05 + |x - channel mean| / mean |x - channel mean|`` (key_weights).
    A key channel's extremes are the tokens attention picks out: unweighted MSE
    clipping of keys raised PPL (measured, see docs/BENCHMARKS.md).
  - *anchor* blocks (the block holding the sequence's first token, the attention sink;
    Xiao et al. 2023, StreamingLLM): keys use a grid that puts token 0 exactly on a code
    level in every channel (the smallest scale covering the channel's min/max with one
    level at token 0's value). Same bytes, different rounding.
  In every case the result's (weighted) squared error per group is never above
  min/max's, except in anchor blocks (token 0 exact, the rest a slightly wider grid).

fp8 (float8 e4m3, the format vLLM, SGLang and TensorRT-LLM ship): ``x ~ float(code) *
scale`` with one scale per (block, kv head) over its T x D elements, keys and values
alike: ``scale = amax |x| / 448`` (e4m3's largest finite value), rounded to the meta dtype
first; codes are ``x / scale`` saturated to +-448 and rounded to nearest even by the cast,
so a code is never NaN (the decode kernel relies on it).

Shapes: blocks come batched as ``[N, H, T, D]`` (N blocks, H kv heads, T tokens, D dims).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

REFINED_BITS = (2,)   # widths that get clipping / least-squares fits (see above)
CLIP_STEPS = 7        # clip candidates per end: 0, CLIP_STEP, ..., 6 * CLIP_STEP of the range
CLIP_STEP = 0.05
LS_ITERS = 8
FIT_CHUNK = 4096      # groups a refined fit takes at a time off CUDA (fit_groups)
KEY_WEIGHT_EPS = 0.05  # floor of a key token's weight (key_weights)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., D] uint8 codes < 2^bits -> [..., D * bits / 8] uint8."""
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, dtype: torch.dtype = torch.int32
                 ) -> torch.Tensor:
    """[..., D * bits / 8] uint8 -> [..., D] codes as ``dtype``, shifted and masked as
    bytes and converted once (the CPU path dequantizes every quantized block it attends
    at every step: with ``addcmul``, int4 keys of 1,000 blocks 35 -> 21 ms, 2-core box)."""
    if bits == 8:
        return packed.to(dtype)
    per, mask = 8 // bits, (1 << bits) - 1
    c = torch.stack([(packed >> (j * bits)) & mask for j in range(per)], -1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(dtype)


def key_weights(g: torch.Tensor) -> torch.Tensor:
    """Weights of the 2-bit key fit, ``[..., T]`` -> ``[..., T]``: a channel's tokens
    count by their distance from the channel's mean (in units of the mean distance) plus
    ``KEY_WEIGHT_EPS``. A token far out in a channel makes a large logit there, and the
    large logits are the ones softmax keeps."""
    n = g.shape[-1]
    dev = (g - g.sum(-1, keepdim=True) / n).abs()
    mad = dev.sum(-1, keepdim=True) / n
    return dev / torch.where(mad > 0, mad, torch.ones_like(mad)) + KEY_WEIGHT_EPS


def _assign(g, w, scale, zero, qmax):
    """Nearest codes of groups ``g [..., n]`` for fp32 scale/zero ``[..., 1]``, and the
    groups' weighted squared errors ``[..., 1]``."""
    s = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: codes 0
    c = torch.round((g - zero) / s).clamp_(0, qmax)
    e = c * scale + zero - g
    return c, (w * e * e).sum(-1, keepdim=True)


def _meta(scale, zero, md):
    return scale.to(md).float(), zero.to(md).float()


def _keep_better(best, cand):
    m = cand[3] < best[3]
    return tuple(torch.where(m, x, y) for x, y in zip(cand, best))


def fit_groups(g: torch.Tensor, bits: int, meta_dtype: torch.dtype,
               clip: bool | Sequence[float] = False, ls_iters: int = 0,
               w: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (fp32 integers) and fp32 scale/zero (meta-rounded) of groups ``g [..., n]``
    along the last dim: min/max, optionally the clip grid, then least-squares steps, each
    kept where it lowers the (``w``-weighted) squared error. ``clip``: True for the grid
    above (each end moved in by 0, CLIP_STEP, ... of the range), or the fractions to try
    (tools/int2_study).

    On CUDA the 2-bit fit with the default grid and steps runs as one Triton kernel
    (engine/kernels/fit_triton.py: every candidate in registers, not ~10 passes over the
    batch per candidate)."""
    if g.is_cuda and clip is True and ls_iters == LS_ITERS:
        from engine.kernels import fit_triton
        if fit_triton.supported(g, bits, meta_dtype):
            return fit_triton.fit2(g, meta_dtype, w)
    step = max(1, FIT_CHUNK * g.shape[-1] // max(1, g[0].numel())) if g.dim() > 1 else 0
    if clip and g.dim() > 1 and g.shape[0] > step:
        # a refined fit makes ~500 passes over its groups: a few thousand groups at a time
        # stay in cache (CPU, 2 cores: 1.6-2.3 -> 0.83 s for the 2-bit values of a
        # 1K-token sequence of the default model). Sliced along the first dim, so every
        # group is reduced over the same strides as before: the same results
        parts = [fit_groups(g[i:i + step], bits, meta_dtype, clip, ls_iters,
                            None if w is None else w[i:i + step])
                 for i in range(0, g.shape[0], step)]
        return tuple(torch.cat([p[j] for p in parts]) for j in range(3))
    g = g.float()
    w = torch.ones_like(g) if w is None else w.float()
    qmax = (1 << bits) - 1
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s, z = _meta((hi - lo) / qmax, lo, meta_dtype)
    c, e = _assign(g, w, s, z, qmax)
    best = (c, s, z, e)
    if clip:
        r = hi - lo
        grid = [i * CLIP_STEP for i in range(CLIP_STEPS)] if clip is True else list(clip)
        for a in grid:
            for b in grid:
                if a == 0 and b == 0:
                    continue
                l2, h2 = lo + a * r, hi - b * r
                s2, z2 = _meta((h2 - l2) / qmax, l2, meta_dtype)
                c2, e2 = _assign(g, w, s2, z2, qmax)
                best = _keep_better(best, (c2, s2, z2, e2))
    sw = w.sum(-1, keepdim=True)
    xm = (w * g).sum(-1, keepdim=True) / sw
    for _ in range(ls_iters):
        c, s, z, _e = best
        cm = (w * c).sum(-1, keepdim=True) / sw
        dc = c - cm
        var = (w * dc * dc).sum(-1, keepdim=True)
        cov = (w * dc * (g - xm)).sum(-1, keepdim=True)
        ok = var > 0
        s2 = torch.where(ok, cov / torch.where(ok, var, torch.ones_like(var)), s).clamp_min(0)
        s2, z2 = _meta(s2, torch.where(ok, xm - s2 * cm, z), meta_dtype)
        c2, e2 = _assign(g, w, s2, z2, qmax)
        best = _keep_better(best, (c2, s2, z2, e2))
    return best[0], best[1], best[2]


def fit_anchored(g: torch.Tensor, bits: int, meta_dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like ``fit_groups``, but element 0 of every group lies on a code level: for each
    level c0 the smallest scale that covers [min, max] with level c0 at ``g[..., 0]``;
    the smallest of those."""
    g = g.float()
    qmax = (1 << bits) - 1
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    x0 = g[..., :1]
    inf = torch.full_like(lo, float("inf"))
    best_s, best_z = inf, x0
    for c0 in range(qmax + 1):
        s = torch.zeros_like(lo)
        s = torch.maximum(s, (x0 - lo) / c0) if c0 > 0 else torch.where(x0 > lo, inf, s)
        s = (torch.maximum(s, (hi - x0) / (qmax - c0)) if c0 < qmax
             else torch.where(x0 < hi, inf, s))
        m = s < best_s
        z = x0 - c0 * torch.where(m, s, torch.zeros_like(s))   # (no 0 * inf)
        best_s, best_z = torch.where(m, s, best_s), torch.where(m, z, best_z)
    s, z = _meta(best_s, best_z, meta_dtype)
    return _assign(g, torch.ones_like(g), s, z, qmax)[0], s, z


def quantize_keys_ref(k: torch.Tensor, bits: int, meta_dtype: torch.dtype,
                      anchor: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k [N, H, T, D] -> codes [N, H, T, D*bits/8] uint8, scale/zero [N, H, D] meta.

    Per channel over the block's T tokens (keys have outlier channels). ``anchor``:
    [N] bool, blocks whose token 0 is the sequence's first (2 bits: kept on the grid).
    """
    g = k.float().transpose(2, 3)                                   # [N, H, D, T]
    refine = bits in REFINED_BITS
    c, s, z = fit_groups(g, bits, meta_dtype, clip=refine, ls_iters=LS_ITERS if refine else 0,
                         w=key_weights(g) if refine else None)
    # on a device the flags are not read back (that waits for the GPU): the anchored fit
    # runs and torch.where keeps it only where a flag is set
    if refine and anchor is not None and (anchor.device.type != "cpu" or bool(anchor.any())):
        ca, sa, za = fit_anchored(g, bits, meta_dtype)
        m = anchor.to(torch.bool).view(-1, 1, 1, 1)
        c, s, z = torch.where(m, ca, c), torch.where(m, sa, s), torch.where(m, za, z)
    codes = c.to(torch.uint8).transpose(2, 3)
    return (pack_codes(codes, bits), s.squeeze(-1).to(meta_dtype),
            z.squeeze(-1).to(meta_dtype))


def dequantize_keys_ref(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                        bits: int, out_dtype: torch.dtype) -> torch.Tensor:
    """codes [N, H, T, D*bits/8], scale/zero [N, H, D] -> [N, H, T, D]."""
    c = unpack_codes(codes, bits, torch.float32)
    return torch.addcmul(zero.float().unsqueeze(2), c, scale.float().unsqueeze(2)).to(out_dtype)


def quantize_values_ref(v: torch.Tensor, bits: int, group: int, meta_dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v [N, H, T, D] -> codes [N, H, T, D*bits/8], scale/zero [N, H, T, D/group]."""
    N, H, T, D = v.shape
    g = v.float().reshape(N, H, T, D // group, group)
    refine = bits in REFINED_BITS
    c, s, z = fit_groups(g, bits, meta_dtype, clip=refine, ls_iters=LS_ITERS if refine else 0)
    return (pack_codes(c.to(torch.uint8).reshape(N, H, T, D), bits),
            s.squeeze(-1).to(meta_dtype), z.squeeze(-1).to(meta_dtype))


def dequantize_values_ref(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                          bits: int, group: int, out_dtype: torch.dtype) -> torch.Tensor:
    """codes [N, H, T, D*bits/8], scale/zero [N, H, T, D/group] -> [N, H, T, D]."""
    c = unpack_codes(codes, bits, torch.float32)
    N, H, T, D = c.shape
    c = c.reshape(N, H, T, D // group, group)
    x = torch.addcmul(zero.float().unsqueeze(-1), c, scale.float().unsqueeze(-1))
    return x.reshape(N, H, T, D).to(out_dtype)


FP8_MAX = 448.0   # largest finite float8 e4m3 (fn) value


def quantize_fp8_ref(x: torch.Tensor, meta_dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H, T, D] -> codes [N, H, T, D] uint8 (e4m3 bits), scale [N, H] meta."""
    xf = x.float()
    amax = xf.abs().amax(dim=(2, 3))                                       # [N, H]
    scale = (amax / FP8_MAX).to(meta_dtype)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # all-zero (or underflowed) tile: codes 0
    c = (xf / s[:, :, None, None]).clamp_(-FP8_MAX, FP8_MAX)
    return c.to(torch.float8_e4m3fn).view(torch.uint8), scale


def dequantize_fp8_ref(codes: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype
                       ) -> torch.Tensor:
    """codes [N, H, T, D] uint8 (e4m3 bits), scale [N, H] -> [N, H, T, D]."""
    x = codes.view(torch.float8_e4m3fn).float() * scale.float()[:, :, None, None]
    return x.to(out_dtype)
