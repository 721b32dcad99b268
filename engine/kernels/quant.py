"""Block quantization (KIVI, Liu et al. 2024): keys per channel, values per token.

Asymmetric codes: ``scale = (max - min) / (2^bits - 1)``, ``zero = min``,
``code = clamp(round((x - zero) / scale), 0, 2^bits - 1)``, ``x ~ code * scale + zero``.
Scale and zero are rounded to the meta dtype *before* codes are computed, so that
dequantization with the stored meta is the exact inverse the codes were made for.
Codes pack ``8 // bits`` channels per byte, low bits first (see engine/layout.py).

Shapes: blocks come batched as ``[N, H, T, D]`` (N blocks, H kv heads, T tokens, D dims).
"""
from __future__ import annotations

import torch


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., D] uint8 codes < 2^bits -> [..., D * bits / 8] uint8."""
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., D * bits / 8] uint8 -> [..., D] int32 codes."""
    if bits == 8:
        return packed.to(torch.int32)
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _codes(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int,
           meta_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).to(meta_dtype)
    zero = lo.to(meta_dtype)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # constant channel: every code 0
    codes = torch.round((x.float() - zero.float()) / s).clamp_(0, qmax).to(torch.uint8)
    return codes, scale, zero


def quantize_keys_ref(k: torch.Tensor, bits: int, meta_dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k [N, H, T, D] -> codes [N, H, T, D*bits/8] uint8, scale/zero [N, H, D] meta.

    Per channel over the block's T tokens (keys have outlier channels).
    """
    lo, hi = k.float().amin(dim=2, keepdim=True), k.float().amax(dim=2, keepdim=True)
    codes, scale, zero = _codes(k, lo, hi, bits, meta_dtype)
    return pack_codes(codes, bits), scale.squeeze(2), zero.squeeze(2)


def dequantize_keys_ref(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                        bits: int, out_dtype: torch.dtype) -> torch.Tensor:
    """codes [N, H, T, D*bits/8], scale/zero [N, H, D] -> [N, H, T, D]."""
    c = unpack_codes(codes, bits).float()
    return (c * scale.float().unsqueeze(2) + zero.float().unsqueeze(2)).to(out_dtype)


def quantize_values_ref(v: torch.Tensor, bits: int, group: int, meta_dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v [N, H, T, D] -> codes [N, H, T, D*bits/8], scale/zero [N, H, T, D/group]."""
    N, H, T, D = v.shape
    g = v.float().reshape(N, H, T, D // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    codes, scale, zero = _codes(g, lo, hi, bits, meta_dtype)
    return (pack_codes(codes.reshape(N, H, T, D), bits),
            scale.squeeze(-1), zero.squeeze(-1))


def dequantize_values_ref(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                          bits: int, group: int, out_dtype: torch.dtype) -> torch.Tensor:
    """codes [N, H, T, D*bits/8], scale/zero [N, H, T, D/group] -> [N, H, T, D]."""
    c = unpack_codes(codes, bits).float()
    N, H, T, D = c.shape
    c = c.reshape(N, H, T, D // group, group)
    x = c * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return x.reshape(N, H, T, D).to(out_dtype)
