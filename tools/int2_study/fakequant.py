"""int2 study (issue 3): fake-quant harness. The store stays full precision; after each
prefill chunk every full, non-newest block not yet processed is replaced in place by
fn(k, v) (quantized then dequantized) -- for the same scheme this gives the same PPL as
the real int2 path (min/max: 12.2246 both). Lets layouts that kvctl does not have
(smaller key groups, rotations, full-precision sink blocks) be measured. From the repo root:

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python tools/int2_study/fakequant.py minmax,sink1,tg16 [--L 4096]

Results: docs/BENCHMARKS.md.
"""
import os, time, torch, sys, math, argparse
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
torch.set_num_threads(1)
from engine.engine import Engine, EngineConfig
from engine import evaluate as ev, attention
from engine.plan import build_plan
from engine.layout import FULL
from engine.store import GPU
from engine.kernels.slots import read_blocks, write_blocks
from engine.kernels.quant import fit_groups

eng = Engine(EngineConfig(model="default", device="cpu", dtype="float32", block_size=32, max_batch_tokens=256, seed=1234))
text = ev.ppl_text_ids(eng.tokenizer)

@torch.inference_mode()
def nll_sim(ids, fn, chunk=256):
    store = eng.store; dev = eng.device
    nll = torch.empty(len(ids) - 1); target = torch.tensor(ids)
    sid = f"sim-{time.time()}"
    kv = store.add_sequence(sid); done = set()
    T = store.block_size
    try:
        for c0 in range(0, len(ids), chunk):
            toks = ids[c0:c0 + chunk]
            store.reserve(sid, len(toks))
            plan = build_plan(store, [], [(sid, toks, 0)], eng.num_layers, dev)
            logits = attention.forward(eng.model, plan.input_ids, plan.position_ids, plan, torch.arange(len(toks)))
            n = min(len(toks), len(ids) - 1 - c0)
            lp = torch.log_softmax(logits[:n].float(), -1)
            nll[c0:c0 + n] = -lp.gather(1, target[c0 + 1:c0 + 1 + n].view(-1, 1))[:, 0]
            todo = [b for b in kv.blocks[:-1] if b.num_tokens == T and b.index not in done]
            if fn is not None and todo:
                arena = store.arenas[GPU]
                offs = torch.tensor([b.offset for b in todo])
                k, v = read_blocks(arena.data, offs, store.geom, FULL, torch.float32)  # [L,n,H,T,D]
                idx = torch.tensor([b.index for b in todo])
                k2, v2 = fn(k, v, idx)
                write_blocks(arena.data, offs, store.geom, FULL, k2, v2)
                done.update(b.index for b in todo)
    finally:
        store.free_sequence(sid)
    return nll[chunk:]

def ppl(fn, L=2048, nw=3):
    wins = ev.ppl_windows(text, L, 3)[:nw]
    nll = torch.cat([nll_sim(w, fn) for _, w in wins]).double()
    return math.exp(float(nll.mean()))

# ---- fake quantizers on groups along the last dim --------------------------------
def fq(g, bits, clip=None, iters=0, md=torch.float32):
    """Quantize-dequantize groups along the last dim: engine/kernels/quant.py's fit_groups
    (min/max, the ``clip`` fractions at each end, ``iters`` least-squares steps)."""
    c, s, z = fit_groups(g, bits, md, clip=clip or False, ls_iters=iters)
    return c * s + z

def keys_fq(k, bits, tg=None, **kw):
    """k [..., T, D]: per channel over token groups of tg."""
    T = k.shape[-2]; tg = tg or T
    x = k.reshape(*k.shape[:-2], T // tg, tg, k.shape[-1]).transpose(-1, -2)   # [..., T/tg, D, tg]
    return fq(x, bits, **kw).transpose(-1, -2).reshape(k.shape)

def vals_fq(v, bits, G=32, **kw):
    D = v.shape[-1]
    return fq(v.reshape(*v.shape[:-1], D // G, G), bits, **kw).reshape(v.shape)

def hadamard(n):
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)
HD = hadamard(64)
GRID = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]

def make(kb=2, vb=2, kw=None, vw=None, tg=None, G=32, rotk=False, rotv=False, sinks=0):
    kw = kw or {}; vw = vw or {}
    def fn(k, v, idx):
        kk = k @ HD if rotk else k
        vv = v @ HD if rotv else v
        kq = keys_fq(kk, kb, tg, **kw) if kb else kk
        vq = vals_fq(vv, vb, G, **vw) if vb else vv
        if rotk: kq = kq @ HD.T
        if rotv: vq = vq @ HD.T
        if sinks:
            keep = (idx < sinks).view(1, -1, 1, 1, 1)
            kq = torch.where(keep, k, kq); vq = torch.where(keep, v, vq)
        return kq, vq
    return fn

C = {
 "full": None,
 "minmax": make(),
 "sink1": make(sinks=1),
 "tg16": make(tg=16),
 "tg8": make(tg=8),
 "G16": make(G=16),
 "clipV": make(vw=dict(clip=GRID)),
 "clipV+sink1": make(vw=dict(clip=GRID), sinks=1),
 "hadKV+clipV": make(rotk=True, rotv=True, vw=dict(clip=GRID)),
 "hadKV+clipKV": make(rotk=True, rotv=True, kw=dict(clip=GRID), vw=dict(clip=GRID)),
 "k2vfull": make(vb=0),
 "kfullv2": make(kb=0),
 "kfullv2clip": make(kb=0, vw=dict(clip=GRID)),
 "k4v2clip": make(kb=4, vw=dict(clip=GRID)),
}
if __name__ == "__main__":
    ap = argparse.ArgumentParser(); ap.add_argument("configs"); ap.add_argument("--L", type=int, default=2048); ap.add_argument("--nw", type=int, default=3)
    a = ap.parse_args()
    for name in a.configs.split(","):
        t = time.time()
        print(f"{name} L={a.L}: {ppl(C[name], a.L, a.nw):.4f} {time.time()-t:.0f}s", flush=True)
