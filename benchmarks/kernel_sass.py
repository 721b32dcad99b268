"""Compile the paged decode kernel for sm_90 on a machine without a GPU and report
registers, spills and a SASS instruction histogram (no device time needed).

    python benchmarks/kernel_sass.py --kb 8 --vb 8 --nbi 2 [--warps 4 --stages 2] [--sass FILE]
    python benchmarks/kernel_sass.py --kb 24 --vb 24     # fp8 (the key / value codes)
    python benchmarks/kernel_sass.py --gluon --maxnreg 168   # the Gluon int4 kernel
    MODE=rowlen|dyn python benchmarks/kernel_sass.py --gluon   # ... in a table mode

Prints registers / shared memory / local memory, the whole kernel's SASS opcode counts
and, per loop (a backward branch), the loop body's size and opcode counts. Uses the
ptxas/cuobjdump that the triton wheel ships; the target is sm_90 (the H200), but the
triton here may differ from the device's (3.9 here, 3.6 there). For the device's:

    pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 python benchmarks/kernel_sass.py --kb 8 --vb 8 --maxnreg 128

(the two differ: at 128 registers int8 spills 24 values a loop with 3.9, none with 3.6).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from engine.kernels import paged_decode_triton as pdt  # noqa: E402
from engine.layout import BlockGeometry, KVFormat  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTR = {"q_ptr": "*fp16", "arena_u8": "*u8", "arena_st": "*fp16", "arena_md": "*fp16",
       "off_ptr": "*i64", "ntok_ptr": "*i32",
       "perm_ptr": "*i64", "rstart_ptr": "*i32", "rlen_ptr": "*i32", "rstart2_ptr": "*i32",
       "rlen2_ptr": "*i32", "S0": "i32", "STOT": "i32",
       "bmax_ptr": "*fp32", "bsum_ptr": "*fp32", "pm_ptr": "*fp32", "pl_ptr": "*fp32",
       "pacc_ptr": "*fp32", "NB": "i32", "FILL": "i32", "blocks_per_split": "i32",
       "qk_scale": "fp32"}


def compile_kernel(consts: dict, warps: int, stages: int, maxnreg: int = 0):
    fn = pdt._paged_decode_kernel
    sig, cx = {}, {}
    for prm in fn.params:
        name = prm.name
        if name in consts or prm.is_constexpr:
            sig[name] = "constexpr"
            cx[name] = consts.get(name, prm.default)
        else:
            sig[name] = PTR[name]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in fn.arg_names if sig[n].startswith("*")}
    src = ASTSource(fn, sig, cx, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages,
                                       **({"maxnreg": maxnreg} if maxnreg else {})))


def compile_gluon(warps: int, maxnreg: int = 0, c16: bool = True, bits: int = 4):
    """The Gluon int4 kernel (engine/kernels/paged_decode_gluon.py) or, with ``bits=8``,
    the int8 one (paged_decode_gluon8.py), at the benchmark's shape."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from engine.kernels import paged_decode_gluon as pdg
    from engine.kernels import paged_decode_gluon8 as pdg8
    mode = os.environ.get("MODE", "")      # the table modes: rowlen, dyn
    geom = BlockGeometry(32, 8, 128, torch.float16, value_group=32)
    if bits == 8:
        fn = pdg8._int8_decode_kernel
        consts = pdg8.kernel_consts(geom, 32, rowlen=mode == "rowlen", dyn=mode == "dyn",
                                    pscale=os.environ.get("PSCALE") == "1",
                                    fp8=os.environ.get("FP8") == "1")
    else:
        fn = pdg._int4_decode_kernel
        consts = pdg.kernel_consts(geom, 32, rowlen=mode == "rowlen", dyn=mode == "dyn",
                                   c16=c16)
    for prm in fn.params:          # constexprs left at their defaults
        if prm.is_constexpr and prm.name not in consts:
            consts[prm.name] = prm.default
    sig = {n: "constexpr" if n in consts else PTR[n] for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in fn.arg_names if sig[n].startswith("*")}
    src = GluonASTSource(fn, sig, consts, attrs)
    opts = dict(num_warps=warps, **({"maxnreg": maxnreg} if maxnreg else {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gluon", action="store_true",
                    help="the Gluon int4 kernel (paged_decode_gluon) instead")
    ap.add_argument("--gluon8", action="store_true",
                    help="the Gluon int8 kernel (paged_decode_gluon8)")
    ap.add_argument("--kb", type=int, default=8, help="key code (KVFormat.k_code; fp8: 24)")
    ap.add_argument("--vb", type=int, default=8, help="value code")
    ap.add_argument("--nbi", type=int, default=2)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--maxnreg", type=int, default=0, help="register cap (the launch's)")
    ap.add_argument("--asm", type=int, default=1, help="PTX code conversion")
    ap.add_argument("--fast", type=int, default=1, help="fp16 dequantization (FAST)")
    ap.add_argument("--extra", default="", help="k=v,... more constexprs")
    ap.add_argument("--c16", type=int, default=1, help="--gluon: codes as 1 + c / 16")
    ap.add_argument("--sass")
    a = ap.parse_args()
    fmt = KVFormat.from_codes(a.kb, a.vb)
    sec = BlockGeometry(32, 8, a.d, torch.float16, value_group=32).sections(fmt)
    consts = dict(HQ=32, H=8, GQ=4, GP=16, T=32, D=a.d, G=32, ESIZE=2, MSIZE=2, KB=a.kb,
                  VB=a.vb, VOFF=sec["v" if fmt.v_bits == 0 else "v_codes"][0], NBI=a.nbi,
                  DT=tl.float16, UPCAST=False, IEEE=False, ASM=a.asm and a.fast, FAST=a.fast,
                  ROWLEN=0)
    for kv in filter(None, a.extra.split(",")):
        k, v = kv.split("=")
        consts[k] = int(v)
    if consts.pop("DT32", 0):
        consts["DT"] = tl.float32
    fn_args = pdt._paged_decode_kernel.arg_names
    consts = {k: v for k, v in consts.items() if k in fn_args}
    ck = compile_gluon(a.warps, a.maxnreg, bool(a.c16), 8 if a.gluon8 else 4) \
        if a.gluon or a.gluon8 else \
        compile_kernel(consts, a.warps, a.stages, a.maxnreg)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        res = subprocess.run([f"{BIN}/cuobjdump", "--dump-resource-usage", f.name],
                             capture_output=True, text=True).stdout
        sass = subprocess.run([f"{BIN}/cuobjdump", "--dump-sass", f.name],
                              capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    ops = collections.Counter()
    ins = []   # (address, opcode, line)
    for line in sass.splitlines():
        mm = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[\w.]+)?",
                      line)
        if mm:
            ops[mm.group(3)] += 1
            ins.append((int(mm.group(1), 16), mm.group(3), line))
    loops = []
    for addr, op, line in ins:
        mb = re.search(r"BRA (?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", line) if op == "BRA" else None
        if mb and mb.group(1) and int(mb.group(1), 16) < addr:
            loops.append((int(mb.group(1), 16), addr))
    for lo, hi in loops:
        body = collections.Counter(op for a, op, _ in ins if lo <= a <= hi)
        print(f"  loop {lo:#x}-{hi:#x}: {sum(body.values())} instrs: "
              + " ".join(f"{k}:{v}" for k, v in body.most_common(30)))
    fmt8 = "fp8" if os.environ.get("FP8") == "1" else "int8"
    what = f"gluon {fmt8} {os.environ.get('MODE', '')}" if a.gluon8 else \
        f"gluon int4 c16={a.c16} {os.environ.get('MODE', '')}" if a.gluon else \
        f"KB={a.kb} VB={a.vb} NBI={a.nbi} warps={a.warps} stages={a.stages} {a.extra}"
    print(f"{what}: "
          f"regs {m.group(1)} stack {m.group(2)} shared {m.group(3)} local {m.group(4)}; "
          f"{sum(ops.values())} instrs")
    print("  " + " ".join(f"{k}:{v}" for k, v in ops.most_common(40)))
    if a.sass:
        open(a.sass, "w").write(sass)
        open(a.sass + ".ttgir", "w").write(ck.asm["ttgir"])


if __name__ == "__main__":
    main()
