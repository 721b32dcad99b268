"""An offload's key summaries (per-channel key min/max a block, for top-k pages) read a
format at a time: the same as each block read alone."""
import torch

from engine import moves
from engine.kernels.slots import read_blocks
from engine.layout import FULL, BlockGeometry, KVFormat
from engine.plan import ints_on
from engine.store import GPU, KVStore


def test_key_summaries_equal_each_block_read_alone():
    geom = BlockGeometry(8, 2, 32, torch.float32)
    st = KVStore(geom, 3, torch.device("cpu"), gpu_bytes=geom.slot_bytes(FULL) * 3 * 40,
                 prefix_cache=False)
    st.add_sequence("a")
    st.reserve("a", 8 * 12)
    st.write_targets("a", 8 * 12 - 3)               # the newest block part-written
    gen = torch.Generator().manual_seed(3)
    data = st.arenas[GPU].data.view(torch.float32)
    data.copy_(torch.randn(data.shape, generator=gen))
    moves.quantize(st, "a", [1, 4, 6], KVFormat(8, 8))
    moves.quantize(st, "a", [2, 7], KVFormat(4, 4))
    blocks = [st.seqs["a"].blocks[i] for i in (7, 0, 1, 2, 3, 11, 4)]   # shuffled, mixed
    got = moves.key_summaries(st, blocks)
    for b, g in zip(blocks, got):
        k, _ = read_blocks(st.arenas[GPU].data, ints_on(torch.device("cpu"), [b.offset]),
                           geom, b.fmt, torch.float32)
        k = k[:, 0, :, :b.num_tokens]
        want = torch.stack([k.amin(2), k.amax(2)], 2)
        assert g.shape == (3, 2, 2, 32) and torch.equal(g, want), b.index
    assert torch.equal(moves.key_summary(st, blocks[0]), got[0])
