"""PPL of formats through the real engine path, the windows of engine.evaluate (3 per
length): ``ppl.py LENGTH fmt1,fmt2``. From the repo root:

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python tools/int2_study/ppl.py 2048 int2
"""
import os, time, torch, sys, math
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
torch.set_num_threads(1)
from engine.engine import Engine, EngineConfig
from engine import evaluate as ev
eng = Engine(EngineConfig(model="default", device="cpu", dtype="float32", block_size=32, max_batch_tokens=256, seed=1234))
text = ev.ppl_text_ids(eng.tokenizer)
L = int(sys.argv[1]); fmts = sys.argv[2].split(",")
for f in fmts:
    t = time.time()
    rs = [ev.teacher_forced_nll(eng, w, f, 256) for _, w in ev.ppl_windows(text, L, 3)]
    nll = torch.cat([r.scored for r in rs]).double()
    print(f, L, math.exp(float(nll.mean())), f"{time.time()-t:.0f}s", flush=True)
