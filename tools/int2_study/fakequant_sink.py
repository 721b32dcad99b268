"""int2 study: which part of the first block (the attention sink) carries the damage.
See fakequant.py.
"""
import os
import sys; sys.argv = [sys.argv[0]] + sys.argv[1:]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakequant.py")).read().split('if __name__ == "__main__":')[0])
def restore(kb, vb, fn=None, mode="tok0", kw=None, vw=None):
    kw = kw or {}; vw = vw or {}
    def f(k, v, idx):
        kq = keys_fq(k, 2, **kw); vq = vals_fq(v, 2, **vw)
        b0 = (idx == 0).view(1, -1, 1, 1, 1)
        if mode == "tok0":
            m = b0 & (torch.arange(32).view(1, 1, 1, 32, 1) == 0)
        else:
            m = b0.expand(-1, -1, 1, 32, 1)
        if kb: kq = torch.where(m, k, kq)
        if vb: vq = torch.where(m, v, vq)
        return kq, vq
    return f
C.update({
 "sinkK": restore(1, 0, mode="block"), "sinkV": restore(0, 1, mode="block"),
 "tok0KV": restore(1, 1), "tok0K": restore(1, 0), "tok0V": restore(0, 1),
})
import argparse
ap = argparse.ArgumentParser(); ap.add_argument("configs"); ap.add_argument("--L", type=int, default=2048); ap.add_argument("--nw", type=int, default=3)
a = ap.parse_args()
for name in a.configs.split(","):
    t = time.time()
    print(f"{name} L={a.L}: {ppl(C[name], a.L, a.nw):.4f} {time.time()-t:.0f}s", flush=True)
