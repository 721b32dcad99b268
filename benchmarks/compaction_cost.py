"""What a compaction costs the engine thread: the KV store of an 8B shape (32-token
blocks, 8 kv heads, head dim 128, bf16; 4 layers: the bookkeeping does not depend on
them, the byte copies do), 49 sequences of 256 blocks allocated in turn (so they share
pages), every other one freed, then every page that can be emptied is. Before that,
the fragmented allocator is copied the two ways a quantize's dry run has copied it
(``copy.deepcopy``, ``SlabAllocator.clone``).

    python -m benchmarks.compaction_cost
"""
import copy
import time

import torch

from engine.layout import FULL, BlockGeometry
from engine.store import GPU, KVStore


def main() -> None:
    geom = BlockGeometry(32, 8, 128, torch.bfloat16)
    layers, n_seq, blocks = 4, 49, 256
    slot = geom.slot_bytes(FULL)
    st = KVStore(geom, layers, torch.device("cpu"),
                 gpu_bytes=int(slot * n_seq * blocks * 1.05) * layers, prefix_cache=False)
    for i in range(n_seq):
        st.add_sequence(f"s{i}")
    for j in range(blocks):          # in turn: the sequences' blocks share pages
        for i in range(n_seq):
            st.reserve(f"s{i}", 32 * (j + 1))
    for i in range(0, n_seq, 2):
        st.free_sequence(f"s{i}", keep=False)
    alloc = st.arenas[GPU].alloc
    for name, fn in (("copy.deepcopy", copy.deepcopy), ("clone", type(alloc).clone)):
        t = time.perf_counter()
        for _ in range(20):
            fn(alloc)
        print(f"{name} of the allocator ({alloc.used_pages} pages used of "
              f"{alloc.num_pages}): {(time.perf_counter() - t) / 20 * 1e3:.2f} ms")
    t = time.perf_counter()
    pages = st.compact(GPU, 10 ** 6)
    dt = time.perf_counter() - t
    held = sum(len(kv.blocks) for kv in st.seqs.values())
    print(f"compacted {pages} pages ({st.compacted_slots} slots) in {dt * 1e3:.1f} ms: "
          f"{dt / max(1, pages) * 1e3:.2f} ms a page; {held} blocks held")


if __name__ == "__main__":
    main()
