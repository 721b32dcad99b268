"""int2 study (issue 3), first round: swap the quantizers that write_blocks calls for
variants (clip search, least squares, Hadamard rotation) and measure PPL through the real
engine path. Run from the repo root:

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python tools/int2_study/patched.py full,minmax,clipKV,lsKV

The variants ignore the anchor flag (they predate it). Results: docs/BENCHMARKS.md.
"""
import os, time, torch, sys, math, argparse
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
torch.set_num_threads(1)
from engine.engine import Engine, EngineConfig
from engine import evaluate as ev
from engine.kernels import slots, quant as Q

def fit_groups(g, bits, md, method="minmax", clip_grid=None, iters=0):
    """g [..., n] float32 groups along last dim -> (codes uint8 [...,n], scale [...,1], zero [...,1]):
    engine/kernels/quant.py's fit_groups with the variant's clip grid and least-squares steps
    (``method`` only names the variant)."""
    c, s, z = Q.fit_groups(g, bits, md, clip=clip_grid or False, ls_iters=iters)
    return c.to(torch.uint8), s, z

VARIANT = {}
ROT = {"k": None, "v": None}

def qk(k, bits, md, anchor=None):
    kk = k.float()
    if ROT["k"] is not None: kk = kk @ ROT["k"]
    g = kk.transpose(2, 3)  # [N,H,D,T]
    c, s, z = fit_groups(g, bits, md, **VARIANT.get("k", {}))
    return Q.pack_codes(c.transpose(2, 3).contiguous(), bits), s.squeeze(-1).to(md), z.squeeze(-1).to(md)

def qv(v, bits, group, md):
    N, H, T, D = v.shape
    vv = v.float()
    if ROT["v"] is not None: vv = vv @ ROT["v"]
    g = vv.reshape(N, H, T, D // group, group)
    c, s, z = fit_groups(g, bits, md, **VARIANT.get("v", {}))
    return Q.pack_codes(c.reshape(N, H, T, D), bits), s.squeeze(-1).to(md), z.squeeze(-1).to(md)

def dk(codes, scale, zero, bits, out_dtype):
    x = Q.dequantize_keys_ref(codes, scale, zero, bits, torch.float32)
    if ROT["k"] is not None: x = x @ ROT["k"].T
    return x.to(out_dtype)

def dv(codes, scale, zero, bits, group, out_dtype):
    x = Q.dequantize_values_ref(codes, scale, zero, bits, group, torch.float32)
    if ROT["v"] is not None: x = x @ ROT["v"].T
    return x.to(out_dtype)

slots.quantize_keys_ref = qk; slots.quantize_values_ref = qv
slots.dequantize_keys_ref = dk; slots.dequantize_values_ref = dv

def hadamard(n):
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)

eng = Engine(EngineConfig(model="default", device="cpu", dtype="float32", block_size=32, max_batch_tokens=256, seed=1234))
text = ev.ppl_text_ids(eng.tokenizer)

def ppl(fmt, L, nw=3):
    wins = ev.ppl_windows(text, L, 3)[:nw]
    rs = [ev.teacher_forced_nll(eng, w, fmt, 256) for _, w in wins]
    nll = torch.cat([r.scored for r in rs]).double()
    return math.exp(float(nll.mean()))

GRID = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
CONFIGS = {
    "minmax": ({}, None),
    "clipK": ({"k": dict(method="clip", clip_grid=GRID)}, None),
    "clipV": ({"v": dict(method="clip", clip_grid=GRID)}, None),
    "clipKV": ({"k": dict(method="clip", clip_grid=GRID), "v": dict(method="clip", clip_grid=GRID)}, None),
    "lsKV": ({"k": dict(method="ls", iters=8), "v": dict(method="ls", iters=8)}, None),
    "clipLsKV": ({"k": dict(method="c", clip_grid=GRID, iters=8), "v": dict(method="c", clip_grid=GRID, iters=8)}, None),
    "clipLsV": ({"v": dict(clip_grid=GRID, iters=8)}, None),
    "lsV": ({"v": dict(iters=8)}, None),
    "lsK": ({"k": dict(iters=8)}, None),
    "hadK": ({}, "k"), "hadV": ({}, "v"), "hadKV": ({}, "kv"),
    "hadKV+clipLs": ({"k": dict(method="c", clip_grid=GRID, iters=8), "v": dict(method="c", clip_grid=GRID, iters=8)}, "kv"),
}
ap = argparse.ArgumentParser(); ap.add_argument("configs"); ap.add_argument("--L", type=int, default=2048)
ap.add_argument("--fmt", default="int2"); ap.add_argument("--nw", type=int, default=3)
a = ap.parse_args()
for name in a.configs.split(","):
    if name == "full":
        t = time.time(); print(f"full L={a.L}: {ppl('full', a.L, a.nw):.4f} {time.time()-t:.0f}s", flush=True); continue
    var, rot = CONFIGS[name]
    VARIANT.clear(); VARIANT.update(var)
    H = hadamard(eng.geom.head_dim)
    ROT["k"] = H if rot and "k" in rot else None
    ROT["v"] = H if rot and "v" in rot else None
    t = time.time()
    print(f"{name} {a.fmt} L={a.L}: {ppl(a.fmt, a.L, a.nw):.4f} {time.time()-t:.0f}s", flush=True)
