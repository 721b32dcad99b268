"""The Triton slot conversion (full-precision slots -> a quantized format, in the arena)
against the torch path it replaces: ``write_blocks`` of ``read_blocks``' fp32 blocks.
Byte for byte over the whole arena (codes, scales, zeros, and nothing else touched), for
every format it takes, at odd head counts, three store dtypes, shuffled offsets and fresh
random keys and values with outlier channels and constant tiles."""
import pytest
import torch

from engine.kernels.slots import read_blocks, write_blocks
from engine.layout import FULL, BlockGeometry, KVFormat
from tests.kernels.kernel_cases import DEVICES, kernel_module, seed_of

FORMATS = [KVFormat(8, 8), KVFormat(4, 4), KVFormat(8, 4), KVFormat(4, 8),
           KVFormat(8, 8, fp8=True), KVFormat(8, 4, fp8=True), KVFormat(4, 8, fp8=True),
           KVFormat(0, 4), KVFormat(4, 0), KVFormat(0, 8, fp8=True)]


def arena_with_blocks(geom, layers, n, fmt, gen, dtype):
    """An arena of random bytes with ``n`` full-precision blocks of random KV at shuffled
    slots, and as many free slots for ``fmt`` after them: (arena, src, dst)."""
    full, new = geom.slot_bytes(FULL), geom.slot_bytes(fmt)
    src = torch.randperm(n, generator=gen) * full
    dst = n * full + torch.randperm(n + 2, generator=gen)[:n] * new
    arena = torch.randint(0, 256, (layers, n * full + (n + 2) * new), generator=gen,
                          dtype=torch.uint8)
    H, T, D = geom.num_kv_heads, geom.block_size, geom.head_dim
    k = torch.randn(layers, n, H, T, D, generator=gen) * 2
    v = torch.randn(layers, n, H, T, D, generator=gen)
    k[..., 3] *= 20                                   # an outlier channel
    v[:, :, :, 1] *= 15                               # an outlier token
    k[:, 0, 0] = 0.5                                  # a constant tile (scale 0)
    v[:, -1, -1, :, :] = -1.25
    write_blocks(arena, src, geom, FULL, k.to(dtype), v.to(dtype))
    return arena, src, dst


def converted(request, device, geom, fmt, n):
    """``n`` random full blocks converted to ``fmt`` by the kernel on ``device`` and by
    the torch path: (kernel's arena, torch path's arena, (src, dst) offsets)."""
    kernel_module(device)
    from engine.kernels.quantize_slots_triton import quantize_slots, supported
    assert supported(geom, fmt)
    gen = torch.Generator().manual_seed(seed_of(request))
    arena, src, dst = arena_with_blocks(geom, 2, n, fmt, gen, geom.store_dtype)
    want = arena.clone()
    write_blocks(want, dst, geom, fmt, *read_blocks(want, src, geom, FULL, torch.float32))
    got = arena.to(device)
    quantize_slots(got, src.to(device), dst.to(device), geom, fmt)
    return got.cpu(), want, (src, dst)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("T,H,D,G,dtype", [
    (32, 3, 64, 32, torch.bfloat16), (8, 1, 32, 16, torch.float16),
    (16, 2, 32, 32, torch.float32)])
def test_quantize_slots_writes_what_the_torch_path_writes(request, device, fmt, T, H, D,
                                                          G, dtype):
    geom = BlockGeometry(T, H, D, dtype, value_group=G)
    got, want, _ = converted(request, device, geom, fmt, 5)
    bad = (got != want).nonzero()
    assert bad.numel() == 0, f"{len(bad)} bytes differ, first at {bad[:4].tolist()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", [KVFormat(4, 2), KVFormat(8, 2), KVFormat(8, 2, fp8=True)],
                         ids=lambda f: f.name)
@pytest.mark.parametrize("T,H,D,G,dtype", [
    (32, 3, 64, 32, torch.bfloat16), (8, 1, 32, 16, torch.float16),
    (16, 2, 128, 64, torch.float32)])
def test_quantize_slots_2bit_values_fit_as_the_torch_path(request, device, fmt, T, H, D, G,
                                                          dtype):
    """2-bit values take the refined fit (48 clipped ranges, 8 least-squares steps): the
    same fit as the torch path up to ties in a sum's last bits, so each group's squared
    error is at most the torch path's (to rounding) and nearly every value decodes the
    same; the keys' bytes and everything outside the values' sections are equal."""
    geom = BlockGeometry(T, H, D, dtype, value_group=G)
    got, want, (src, dst) = converted(request, device, geom, fmt, 3)
    _, v0 = read_blocks(want, src, geom, FULL, torch.float32)
    sec = geom.sections(fmt)
    vstart = sec["v_codes"][0]
    outside = torch.ones(got.shape[1], dtype=torch.bool)
    for o in dst.tolist():
        outside[o + vstart:o + geom.slot_bytes(fmt)] = False   # the values' sections
    assert torch.equal(got[:, outside], want[:, outside])      # keys and all the rest
    _, vg = read_blocks(got, dst, geom, fmt, torch.float32)
    _, vw = read_blocks(want, dst, geom, fmt, torch.float32)

    def err(v):
        return ((v - v0) ** 2).reshape(*v.shape[:-1], D // G, G).sum(-1)
    eg, ew = err(vg), err(vw)
    assert torch.all(eg <= ew * (1 + 1e-4) + 1e-6), (eg - ew).max()
    # (an fp32 meta dtype keeps a least-squares scale's last bits, which a sum's order
    # moves: close, not equal)
    assert torch.isclose(vg, vw, rtol=1e-4, atol=1e-6).float().mean() >= 0.97


def test_quantize_slots_refuses_what_it_does_not_take():
    from engine.kernels.quantize_slots_triton import quantize_slots, supported
    geom = BlockGeometry(32, 2, 64, torch.bfloat16)
    for fmt in (KVFormat(2, 2), KVFormat(2, 4), FULL):
        assert not supported(geom, fmt)
    assert not supported(BlockGeometry(24, 2, 64, torch.bfloat16), KVFormat(4, 4))
    arena = torch.zeros(1, 1 << 16, dtype=torch.uint8)
    offs = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="does not take"):
        quantize_slots(arena, offs, offs, geom, KVFormat(2, 4))
    with pytest.raises(ValueError, match="int64"):
        quantize_slots(arena, offs.int(), offs, geom, KVFormat(4, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_codes_round_ties_to_even_like_torch(device):
    """Values halfway between two e4m3 codes (normal and subnormal, both signs), with the
    tile's scale exactly 1: the kernel's bytes are torch's float8_e4m3fn conversion."""
    kernel_module(device)
    from engine.kernels.quantize_slots_triton import quantize_slots
    geom = BlockGeometry(16, 1, 32, torch.float32)
    fmt = KVFormat(8, 8, fp8=True)
    codes = torch.arange(0, 127, dtype=torch.uint8)              # every finite magnitude
    vals = codes.view(torch.float8_e4m3fn).float()
    mids = (vals[:-1] + vals[1:]) / 2                             # exact ties in fp32
    x = torch.cat([mids, -mids, vals, torch.tensor([448.0, -0.0, 1e-4, -3e-3])])
    assert x.numel() <= 512
    x = torch.cat([x, torch.zeros(512 - x.numel())])
    x[0] = 448.0                                                  # amax / 448 = 1
    k = x.reshape(1, 1, 1, 16, 32)
    arena = torch.zeros(1, 2 * geom.slot_bytes(FULL), dtype=torch.uint8)
    src = torch.tensor([0])
    dst = torch.tensor([geom.slot_bytes(FULL)])
    write_blocks(arena, src, geom, FULL, k, k.flip(-1))
    want = arena.clone()
    write_blocks(want, dst, geom, fmt, *read_blocks(want, src, geom, FULL, torch.float32))
    got = arena.to(device)
    quantize_slots(got, src.to(device), dst.to(device), geom, fmt)
    assert torch.equal(got.cpu(), want)


def test_quantize_moves_through_the_kernel_store_what_the_torch_path_stores(monkeypatch):
    """moves.quantize with the slot conversion routed (the interpreter standing in for
    CUDA) against the same moves on the torch path: the same block tables and the same
    arena bytes, for fill-style conversions of full blocks into several formats and a
    lossy block converted again (which keeps the torch path)."""
    kernel_module("cpu")
    from engine import moves
    from engine.kernels import quantize_slots_triton
    from engine.store import GPU, KVStore

    geom = BlockGeometry(16, 2, 32, torch.bfloat16)
    gen = torch.Generator().manual_seed(7)

    def store():
        st = KVStore(geom, 3, torch.device("cpu"), gpu_bytes=geom.slot_bytes(FULL) * 3 * 64,
                     prefix_cache=False)
        for sid in ("a", "b"):
            st.add_sequence(sid)
            st.reserve(sid, 16 * 12)
            st.write_targets(sid, 16 * 12)
        return st
    ref, fused = store(), store()
    data = torch.randn(ref.arenas[GPU].data.numel() // 2, generator=gen).to(torch.bfloat16)
    for st in (ref, fused):
        st.arenas[GPU].data.view(torch.bfloat16).view(-1).copy_(data)
    calls = []

    def routed(arena, st, fmt):
        run = quantize_slots_triton.quantize_slots if quantize_slots_triton.supported(
            st.geom, fmt) else None
        if run is not None:
            calls.append(fmt.name)
        return run
    steps = [("a", range(0, 5), KVFormat(4, 4)), ("b", range(2, 9), KVFormat(8, 8, fp8=True)),
             ("a", range(5, 11), KVFormat(8, 4)), ("b", range(0, 2), KVFormat(4, 2)),
             ("b", range(3, 6), KVFormat(4, 4))]          # fp8 blocks again: torch path
    for sid, idx, fmt in steps:
        moves.quantize(ref, sid, list(idx), fmt)
        with monkeypatch.context() as m:
            m.setattr(moves, "_fused", routed)
            moves.quantize(fused, sid, list(idx), fmt)
    assert calls == ["int4", "fp8", "k8v4", "k4v2"]   # a lossy source: torch path
    for sid in ("a", "b"):
        assert [(b.fmt, b.offset) for b in ref.seqs[sid].blocks] == \
            [(b.fmt, b.offset) for b in fused.seqs[sid].blocks]
    assert torch.equal(ref.arenas[GPU].data, fused.arenas[GPU].data)
