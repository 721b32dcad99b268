"""Each block's format chosen once from its attention statistics; eviction only where it
costs less than the next format down (mixed-precision KV caches: MiKV, Yang et al.
2024; ZipCache, He et al. 2024; KIVI blocks, Liu et al. 2024).

A block leaves full precision once, straight into the format this plan picks for it.
It is never quantized again: new codes from lossy codes compound the error, and the
plan already had every format to choose from. Blocks already lossy may still be
evicted (the one move left for them when pressure grows later).

Which format: per block, a ladder of options (full, int8, int4, k4v2, int2, evicted),
each with the bytes it frees and its heuristic accuracy cost (controller/predictors/
costs.py: the format's measured cost scaled by the block's importance; eviction by its
attention mass plus a price per share of blocks). Each block's ladder is cut to its
lower convex hull, and the plan takes steps in order of added cost per byte freed
across all blocks until the target is met (the last one: the cheapest single change
that finishes it): the greedy solution of this multiple-choice knapsack, optimal up to
the last step. Keys keep their bits longest (k4v2 before
int2): keys carry the damage (FACTS). Importance is the largest of the block's decayed
attention share (H2O), its share of the prompt's last queries (SnapKV) and its share of
key distinctness (KeyDiff: keys far from the sequence's mean key; engine/plan.py): a
block any signal needs is kept well. The last one is query-agnostic: when the question
comes after compression, nothing the prompt attended to points at the needle, but its
keys stand out from the filler's.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

from engine.actions import Evict, KVFormat, Quantize
from controller.predictors.costs import evict_cost, quantize_cost_terms
from controller.strategies.base import Candidate, Context, Strategy, movable

EVICTED = "evicted"


@dataclass
class MixedPrecision(Strategy):
    kind = "quantize"            # 'evict' on candidates that evict any block
    formats: tuple[str, ...] = ("int8", "int4", "k4v2", "int2")
    evict: bool = True
    recent_blocks: int = 2       # the newest blocks are never evicted
    variant: str = ""            # a second ladder in the registry: its name's suffix

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"mixed_precision_{self.variant}" if self.variant else "mixed_precision"

    @property
    def fill_formats(self) -> tuple[str, ...]:
        return self.formats

    def _options(self, ctx: Context, fmt: str, base: int) -> list[tuple[int, float, float, str]]:
        """A block of ``fmt`` holding ``base`` bytes: (bytes freed, the format's cost
        factor, its per-share term, option) of staying as it is and of each format
        that frees bytes (quantize_cost's terms, so each block only scales them), by
        bytes freed."""
        fb = ctx.format_bytes
        out = [(0, *quantize_cost_terms(fmt), fmt)]
        if fmt == "full":
            out += [(base - fb[f], *quantize_cost_terms(f), f) for f in self.formats
                    if f in fb and fb[f] < base]
        return sorted(out, key=lambda o: o[0])

    @staticmethod
    def _ladder(options, base: int, w: float, share: float, evictable: bool):
        """(bytes freed, cost, option) on the lower convex hull, from the block as it is
        (a lossy block's cost so far counts: only eviction's extra is added).
        ``options`` by bytes freed (_options); eviction frees the most."""
        ws = w + share
        hull: list[tuple[int, float, str]] = []      # lower convex hull (monotone chain)
        pts = [(x, c * ws + k2 * share, f) for x, c, k2, f in options]
        if evictable:
            pts.append((base, evict_cost(w, share), EVICTED))
        for p in pts:
            x, y = p[0], p[1]
            if hull and x == hull[-1][0]:
                if y >= hull[-1][1]:
                    continue                  # same bytes, costlier: dominated
                hull.pop()
            while len(hull) >= 2:
                (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
                # the middle point lies on or above the line from its left neighbour to p
                if (y2 - y1) * (x - x1) >= (y - y1) * (x2 - x1):
                    hull.pop()
                else:
                    break
            hull.append(p)
        return hull

    def plan(self, seq, target_bytes: int, ctx: Context) -> dict[int, str]:
        """Block index -> the option chosen for it (only blocks that change).

        Blocks of one class (format, bytes, evictable) share their options, and every
        option's cost grows with a block's importance, so a colder block's steps are
        never dearer than a warmer one's: a class's blocks enter the heap coldest first,
        the next one when the one before it takes its first step. The greedy order is
        the one with every ladder built up front; only the ladders it reaches are built
        (128 sequences x 1,000 blocks: 0.9 s a plan with all of them,
        benchmarks/policy_tick.py). The last step looks at the blocks in the heap, each
        class's coldest untouched block among them."""
        attended = [b for b in seq.blocks if b.tier in ("gpu", "host")] or seq.blocks
        total_mass = sum(b.mass for b in attended) or 1.0
        total_obs = sum(b.observed for b in attended) or 1.0
        share = 1.0 / max(1, len(attended))
        newest = seq.blocks[-1].index if seq.blocks else 0
        classes: dict[tuple[str, int, bool], list[tuple[float, int]]] = {}
        for b in movable(seq, ctx, keep_sinks=False):
            evictable = (self.evict and b.index >= ctx.num_sink_blocks
                         and b.index <= newest - self.recent_blocks)
            w = max(b.mass / total_mass, b.observed / total_obs, b.distinct)
            classes.setdefault((b.fmt, b.nbytes, evictable), []).append((w, b.index))
        heap: list[tuple[float, int, int]] = []
        ladders: dict[int, list] = {}
        options: dict[tuple[str, int, bool], list] = {}
        next_of: dict[tuple[str, int, bool], int] = {}
        class_of: dict[int, tuple[str, int, bool]] = {}

        def enter(key) -> None:
            """The class's coldest block not yet in the heap, with its first step."""
            at = next_of[key]
            blocks = classes[key]
            if at < len(blocks):
                next_of[key] = at + 1
                w, i = blocks[at]
                ladder = self._ladder(options[key], key[1], w, share, key[2])
                ladders[i], class_of[i] = ladder, key
                heapq.heappush(heap, (_slope(ladder, 0), i, 0))

        for key, blocks in classes.items():
            fmt, nbytes, evictable = key
            options[key] = self._options(ctx, fmt, nbytes)
            if len(options[key]) + evictable < 2:
                continue                      # nothing to change in this class
            blocks.sort()
            next_of[key] = 0
            enter(key)
        chosen: dict[int, str] = {}
        freed = 0
        while heap and freed < target_bytes:
            left = target_bytes - freed
            _, i, at = heap[0]
            ladder = ladders[i]
            if ladder[at + 1][0] - ladder[at][0] >= left:
                # the last step: the flattest one may overshoot at a higher cost than
                # another change that also finishes; take the cheapest that finishes
                _, k, j = min((ladders[k][j][1] - ladders[k][a][1], k, j)
                              for _, k, a in heap for j in range(a + 1, len(ladders[k]))
                              if ladders[k][j][0] - ladders[k][a][0] >= left)
                chosen[k] = ladders[k][j][2]
                break
            heapq.heappop(heap)
            freed += ladder[at + 1][0] - ladder[at][0]
            chosen[i] = ladder[at + 1][2]
            if at + 2 < len(ladder):
                heapq.heappush(heap, (_slope(ladder, at + 1), i, at + 1))
            if at == 0:
                enter(class_of[i])
        return chosen

    def propose(self, seq, target_bytes, ctx):
        chosen = self.plan(seq, target_bytes, ctx)
        if not chosen:
            return None
        by_index = {b.index: b for b in seq.blocks}
        groups: dict[str, list[int]] = {}
        for i, opt in sorted(chosen.items()):
            groups.setdefault(opt, []).append(i)
        parts, actions = [], []
        for opt, idx in sorted(groups.items(), key=lambda g: g[0] == EVICTED):
            blocks = tuple(idx)
            if opt == EVICTED:
                act = Evict(seq.seq_id, blocks)
                freed = sum(by_index[i].nbytes for i in blocks)
                parts.append(Candidate("heavy_hitter", seq.seq_id, (act,), blocks, freed,
                                       False, "evict"))
            else:
                f = KVFormat.parse(opt)
                act = Quantize(seq.seq_id, blocks, f.k_bits, f.v_bits)
                freed = sum(by_index[i].nbytes - ctx.format_bytes[opt] for i in blocks)
                parts.append(Candidate(f"quantize_{opt}", seq.seq_id, (act,), blocks, freed,
                                       False, "quantize"))
            actions.append(act)
        kind = "evict" if EVICTED in groups else "quantize"
        return Candidate(self.name, seq.seq_id, tuple(actions), tuple(sorted(chosen)),
                         sum(p.freed_bytes for p in parts), False, kind, tuple(parts))


def _slope(ladder, at: int) -> float:
    (x1, y1, _), (x2, y2, _) = ladder[at], ladder[at + 1]
    return (y2 - y1) / (x2 - x1)
