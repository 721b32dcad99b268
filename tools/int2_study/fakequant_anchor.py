"""int2 study: sink-aware key grid (anchor), weighted key fits, rotation on top.
See fakequant.py. --clipw: the weighted key fit also searches the clip grid.
"""
import os
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakequant.py")).read().split('if __name__ == "__main__":')[0])

def fq_anchor(g, bits, a_idx=0, md=torch.float32):
    """groups along last dim; element a_idx of each group lies exactly on the grid."""
    qmax = (1 << bits) - 1
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    x0 = g[..., a_idx:a_idx + 1]
    best_s = None
    for c0 in range(qmax + 1):
        s = torch.zeros_like(lo)
        if c0 > 0: s = torch.maximum(s, (x0 - lo) / c0)
        else: s = torch.where(x0 > lo, torch.full_like(s, float("inf")), s)
        if c0 < qmax: s = torch.maximum(s, (hi - x0) / (qmax - c0))
        else: s = torch.where(x0 < hi, torch.full_like(s, float("inf")), s)
        z = x0 - c0 * s
        if best_s is None:
            best_s, best_z = s, z
        else:
            m = s < best_s
            best_s = torch.where(m, s, best_s); best_z = torch.where(m, z, best_z)
    s = best_s.to(md).float(); z = best_z.to(md).float()
    s1 = torch.where(s > 0, s, torch.ones_like(s))
    c = torch.round((g - z) / s1).clamp(0, qmax)
    return c * s + z

def mk(kw=None, vw=None, sinks=0, anchor0=False, kb=2, vb=2, rot=False, tok0v=False):
    kw = kw or {}; vw = vw or {}
    def f(k0, v0, idx):
        k, v = (k0 @ HD, v0 @ HD) if rot else (k0, v0)
        kq = keys_fq(k, kb, **kw) if kb else k.clone(); vq = vals_fq(v, vb, **vw) if vb else v.clone()
        b0 = (idx == 0)
        if anchor0 and b0.any():
            kb0 = k[:, b0].transpose(-1, -2)                 # [L, n, H, D, T]
            kq[:, b0] = fq_anchor(kb0, kb).transpose(-1, -2)
        if sinks:
            keep = (idx < sinks).view(1, -1, 1, 1, 1)
            kq = torch.where(keep, k, kq); vq = torch.where(keep, v, vq)
        if tok0v and (idx == 0).any():
            vq[:, idx == 0, :, 0] = v[:, idx == 0, :, 0]
        if rot: kq, vq = kq @ HD.T, vq @ HD.T
        return kq, vq
    return f
CL = dict(clip=GRID, iters=8)
CLIPW = False
def fqw(g, bits, wpow=1.0, iters=8, md=torch.float32, eps=0.05, wt=None):
    """weighted LS: w = eps + |x - mean|^wpow (emphasize extremes)."""
    qmax = (1 << bits) - 1
    xm = g.mean(-1, keepdim=True)
    if wt is None:
        w = (g - xm).abs() ** wpow; w = w / w.mean(-1, keepdim=True).clamp_min(1e-12) + eps
    else:
        w = wt
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = (hi - lo) / qmax; z = lo
    def asg(s, z):
        s1 = torch.where(s > 0, s, torch.ones_like(s))
        c = torch.round((g - z) / s1).clamp(0, qmax)
        return c, (w * (c * s + z - g) ** 2).sum(-1, keepdim=True)
    c, err = asg(s, z)
    if CLIPW:
        r = hi - lo
        for a in GRID:
            for b in GRID:
                if a == 0 and b == 0: continue
                s2 = (r * (1 - a - b)) / qmax; z2 = lo + a * r
                c2, e2 = asg(s2, z2); m = e2 < err
                c, s, z, err = torch.where(m, c2, c), torch.where(m, s2, s), torch.where(m, z2, z), torch.where(m, e2, err)
    for _ in range(iters):
        W = w.sum(-1, keepdim=True)
        cm = (w * c).sum(-1, keepdim=True) / W; xw = (w * g).sum(-1, keepdim=True) / W
        var = (w * (c - cm) ** 2).sum(-1, keepdim=True); cov = (w * (c - cm) * (g - xw)).sum(-1, keepdim=True)
        ok = var > 0
        s2 = torch.where(ok, cov / torch.where(ok, var, torch.ones_like(var)), s).clamp_min(0)
        z2 = torch.where(ok, xw - s2 * cm, z)
        c2, e2 = asg(s2, z2); m = e2 < err
        c, s, z, err = torch.where(m, c2, c), torch.where(m, s2, s), torch.where(m, z2, z), torch.where(m, e2, err)
    return c * s + z
def keys_w(k, bits, wpow):
    x = k.transpose(-1, -2)
    return fqw(x, bits, wpow).transpose(-1, -2)
def keys_w(k, bits, wpow, eps=0.05, tok=False):
    x = k.transpose(-1, -2)          # [..., D, T]
    wt = None
    if tok:
        dev = (x - x.mean(-1, keepdim=True)); nrm = (dev * dev).sum(-2, keepdim=True)  # [...,1,T]
        wt = nrm / nrm.mean(-1, keepdim=True).clamp_min(1e-12) + eps
        wt = wt.expand_as(x)
    return fqw(x, bits, wpow, eps=eps, wt=wt).transpose(-1, -2)
def mkw(wpow, eps=0.05, tok=False):
    base = mk(kw=dict(iters=8), vw=CL, anchor0=True)
    def f(k, v, idx):
        kq, vq = base(k, v, idx)
        nz = idx != 0
        kq[:, nz] = keys_w(k[:, nz], 2, wpow, eps, tok)
        return kq, vq
    return f
GRID10 = [0.0, 0.1, 0.2, 0.3]
def mkrot(base):
    """base applied to Hadamard-rotated k, v (per head, 64 x 64); rotated back after."""
    def f(k, v, idx):
        kq, vq = base(k @ HD, v @ HD, idx)
        return kq @ HD.T, vq @ HD.T
    return f
C.update({
 "sink1+clipLsV": mk(vw=CL, sinks=1),
 "sink1+clipK+clipLsV": mk(kw=dict(clip=GRID), vw=CL, sinks=1),
 "sink1+lsK+clipLsV": mk(kw=dict(iters=8), vw=CL, sinks=1),
 "anchor0+clipLsV": mk(vw=CL, anchor0=True),
 "anchor0+clipV": mk(vw=dict(clip=GRID), anchor0=True),
 "anchor0": mk(anchor0=True),
 "anchor0+clipK+clipLsV": mk(kw=dict(clip=GRID), vw=CL, anchor0=True),
 "anchor0+lsK+clipLsV": mk(kw=dict(iters=8), vw=CL, anchor0=True),
 "clipK+clipLsV": mk(kw=dict(clip=GRID), vw=CL),
 "A": mk(kw=dict(iters=8), vw=CL, anchor0=True),
 "A_konly": mk(kw=dict(iters=8), vb=0, anchor0=True),
 "A_vonly": mk(vw=CL, kb=0),
 "A_tok0v": mk(kw=dict(iters=8), vw=CL, anchor0=True, tok0v=True),
 "A_clipLsK": mk(kw=CL, vw=CL, anchor0=True),
 "A_rot": mk(kw=dict(iters=8), vw=CL, anchor0=True, rot=True),
 "rot_minmax": mk(rot=True),
 "A_grid10": mk(kw=dict(iters=8), vw=dict(clip=GRID10, iters=8), anchor0=True),
 "A_w1": mkw(1.0), "A_w2": mkw(2.0), "A_w05": mkw(0.5), "A_w1e0": mkw(1.0, 0.0), "A_w1e02": mkw(1.0, 0.2),
 "A_wtok": mkw(1.0, 0.05, True),
 "A_w1_rot": mkrot(mkw(1.0)),   # with --clipw: the committed int2 method, rotated
})
import argparse
ap = argparse.ArgumentParser(); ap.add_argument("configs"); ap.add_argument("--L", type=int, default=2048); ap.add_argument("--nw", type=int, default=3)
ap.add_argument("--clipw", action="store_true"); a = ap.parse_args(); CLIPW = a.clipw
for name in a.configs.split(","):
    t = time.time()
    print(f"{name} L={a.L}: {ppl(C[name], a.L, a.nw):.4f} {time.time()-t:.0f}s", flush=True)
