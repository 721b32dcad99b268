"""What KV-cache compression costs in accuracy: perplexity, passkey retrieval, KV bytes.

    python -m benchmarks.evaluate --formats full,int8,fp8,int4,int2,k4v2 \\
        --ppl-lengths 2048,4096 --passkey-lengths 1024,2048,4096 --depths 10 --threads 2
    python -m benchmarks.evaluate --quick          # smoke run (minutes)

Everything runs through kvctl's own engine (store, plans, kvctl attention, quantize
moves), so the numbers are what a user of the engine gets, not a simulation.

Perplexity — teacher-forced chunked prefill (``teacher_forced_nll``). A window of text
goes through the model in chunks of ``C`` tokens (``--chunk``, default 256). Each chunk
attends over the *stored* cache of all earlier chunks (in the format under test) plus
itself at full precision, and logits are kept for every row of the chunk. After each
chunk, every full block except the newest is re-stored in the format under test (the
engine's ``SetFillFormat`` rule, ``moves.fill_candidates`` + ``moves.quantize``). So the
residual window at full precision is the newest block (``block_size`` tokens) plus the
current chunk. Scored: fp32 NLL of every token predicted by a row of the second or a
later chunk (targets ``C+1 .. L-1``); the rows of the first chunk never see quantized
KV, so they would only dilute the difference. The NLL over all ``L-1`` predicted tokens
is kept too (``ppl_all``). Text: the stdlib's ``pydoc_data.topics`` (``topics.values()``
joined by blank lines), windows of ``L`` tokens at evenly spaced offsets; the same
windows for every format.

Passkey — raw completion (``build_passkey_prompt``): a one-line instruction, filler
("The grass is green. ..."), the needle "The pass key is NNNNN. Remember it. NNNNN is the
pass key." at a given depth, filler, then "What is the pass key? The pass key is".
Keys are random 5-digit numbers from a fixed seed, one per (length, depth), the same for
every format. The prompt goes through the normal engine (``Engine.submit`` + ``step``,
prefill chunks of ``C`` tokens); after the first step the sequence gets
``SetFillFormat`` and its filled blocks are quantized, so every later prefill chunk and
every decode step reads the quantized cache (checked: at the first decode step all
blocks but the newest are in the format). Greedy, ``--new`` tokens; a hit = the key's
digits appear in the output text.

KV bytes — the store's exact accounting (``store.bytes_by``) of the longest perplexity
window at its end (the newest block still full precision), per 1K tokens, and the
per-block ratio to full precision (the asymptotic ratio).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from engine.actions import Quantize
from engine.layout import KVFormat
from engine.store import GPU

_ids = itertools.count(1)

FILLER = ("The grass is green. The sky is blue. The sun is yellow. "
          "Here we go. There and back again.")
INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about the important information there.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"

# the goals: PPL increase at most (fraction), passkey int4 == full
PPL_GOALS = {"int8": 0.005, "int4": 0.02, "int2": 0.08}


def _fmt(f: str | KVFormat) -> KVFormat:
    return f if isinstance(f, KVFormat) else KVFormat.parse(f)


# -- perplexity ---------------------------------------------------------------------------
@dataclass
class NLLResult:
    fmt: str
    num_tokens: int
    chunk: int
    nll: torch.Tensor            # [L-1] fp32: nll[i] = -log p(ids[i+1] | ids[:i+1])
    kv_bytes_by_format: dict[str, int]
    kv_bytes: int
    quantized_blocks: int        # blocks in the tested format at the end
    num_blocks: int

    @property
    def scored(self) -> torch.Tensor:
        """NLL of the tokens predicted by rows of the second and later chunks."""
        return self.nll[self.chunk:]

    @property
    def ppl(self) -> float:
        return math.exp(float(self.scored.double().mean()))

    @property
    def ppl_all(self) -> float:
        return math.exp(float(self.nll.double().mean()))


@torch.inference_mode()
def teacher_forced_nll(engine, ids: list[int], fmt: str | KVFormat = "full",
                       chunk: int = 256) -> NLLResult:
    """Chunked teacher-forced prefill of a held sequence (engine.prefill / extend: the
    engine's store, plans and attention; see the module docstring), blocks re-stored in
    ``fmt`` as they fill between chunks. The sequence is released afterwards."""
    fmt = _fmt(fmt)
    if len(ids) < 2:
        raise ValueError("need at least 2 tokens")
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    sid = f"eval-nll-{next(_ids)}"
    nll = torch.empty(len(ids) - 1, dtype=torch.float32)
    target = torch.tensor(ids, dtype=torch.long)
    try:
        for c0 in range(0, len(ids), chunk):
            toks = ids[c0:c0 + chunk]
            logits = (engine.prefill(sid, toks, observe=False, logits="all") if c0 == 0
                      else engine.extend(sid, toks, logits="all"))
            n = min(len(toks), len(ids) - 1 - c0)      # rows that predict a next token
            if n > 0:
                lp = torch.log_softmax(logits[:n].float(), -1).cpu()
                nll[c0:c0 + n] = -lp.gather(1, target[c0 + 1:c0 + 1 + n].view(-1, 1))[:, 0]
            if not fmt.is_full:
                quantize_filled(engine, sid, fmt)
        view = seq_view(engine, sid)
        by_fmt = dict(view.bytes_by_format)
        nq = sum(b.fmt == fmt.name for b in view.blocks) if not fmt.is_full else 0
        nb = len(view.blocks)
    finally:
        if sid in engine.held:
            engine.release(sid)
    return NLLResult(fmt.name, len(ids), chunk, nll, by_fmt, sum(by_fmt.values()), nq, nb)


def seq_view(engine, seq_id: str):
    """The engine's published view of one sequence."""
    return next(v for v in engine.handle.snapshot().sequences if v.seq_id == seq_id)


def quantize_filled(engine, seq_id: str, fmt: KVFormat) -> None:
    """Re-store a sequence's full-precision blocks that are fully written (all but the
    newest) in ``fmt``, as a fill format would."""
    view = seq_view(engine, seq_id)
    T = engine.store.block_size
    idx = tuple(b.index for b in view.blocks[:-1]
                if b.tier == "gpu" and b.fmt == "full" and b.num_tokens == T)
    if idx:
        engine.handle.apply(Quantize.to(seq_id, idx, fmt))


def ppl_text_ids(tokenizer) -> list[int]:
    import pydoc_data.topics as t
    return tokenizer("\n\n".join(t.topics.values()))["input_ids"]


def ppl_windows(ids: list[int], length: int, count: int) -> list[tuple[int, list[int]]]:
    """``count`` windows of ``length`` tokens at evenly spaced offsets."""
    if length > len(ids):
        raise ValueError(f"text has {len(ids)} tokens, fewer than a window of {length}")
    span = len(ids) - length
    offs = [0] if count == 1 else [round(i * span / (count - 1)) for i in range(count)]
    return [(o, ids[o:o + length]) for o in offs]


# -- passkey ------------------------------------------------------------------------------
@dataclass
class PasskeyPrompt:
    ids: list[int]
    key: str
    depth: float                 # asked: fraction of the prompt before the needle
    needle_token: int            # token index where the needle's text starts
    text: str

    @property
    def actual_depth(self) -> float:
        return self.needle_token / len(self.ids)


def _ntok(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def build_passkey_prompt(tokenizer, total_tokens: int, depth: float, key: str
                         ) -> PasskeyPrompt:
    """Instruction, filler, needle at ``depth`` (0..1 of the prompt's tokens), filler,
    question. The filler is whole sentences of ``FILLER`` in their cycle (~5 tokens each),
    so the total lands within a few tokens of ``total_tokens`` and the needle within a
    sentence of the asked depth (clipped: it cannot go before the instruction or after
    the question)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle = NEEDLE.format(key=key)
    sentences = [x + "." for x in FILLER.rstrip(".").split(". ")]

    def fill(a: int, b: int) -> list[str]:
        return [sentences[i % len(sentences)] for i in range(a, b)]

    def compose(k: int, n: int) -> tuple[str, str]:
        before = " ".join([INTRO] + fill(0, k))
        return before, " ".join([before, needle] + fill(k, n) + [QUESTION])

    per = _ntok(tokenizer, " ".join(fill(0, 100))) / 100
    fixed = _ntok(tokenizer, " ".join([INTRO, needle, QUESTION]))
    n = max(0, round((total_tokens - fixed) / per))
    # tune the sentence count so that the token count lands closest to the target
    best = None
    for cand in range(max(0, n - 4), n + 5):
        err = abs(_ntok(tokenizer, compose(cand, cand)[1]) - total_tokens)
        if best is None or err < best[0]:
            best = (err, cand)
    n = best[1]
    # needle start as close as possible to depth * total tokens
    target = depth * total_tokens
    k = min(n, max(0, round((target - _ntok(tokenizer, INTRO)) / per)))
    for cand in sorted({max(0, k - 1), k, min(n, k + 1)}):
        if abs(_ntok(tokenizer, compose(cand, n)[0]) - target) < \
                abs(_ntok(tokenizer, compose(k, n)[0]) - target):
            k = cand
    before, text = compose(k, n)
    ids = tokenizer(text)["input_ids"]
    return PasskeyPrompt(ids, key, depth, _ntok(tokenizer, before), text)


def passkey_keys(lengths: list[int], depths: list[float], seed: int = 1234
                 ) -> dict[tuple[int, int], str]:
    rng = random.Random(seed)
    return {(L, i): str(rng.randint(10000, 99999)) for L in lengths for i in range(len(depths))}


@dataclass
class PasskeyTrial:
    fmt: str
    length: int
    depth: float
    key: str
    output: str
    hit: bool
    prompt_tokens: int
    quantized_at_decode: int     # blocks in the format at the first decode step
    blocks_at_decode: int        # all blocks then (the newest stays full precision)
    kv_bytes_by_format: dict[str, int] = field(default_factory=dict)


def passkey_trial(engine, prompt: PasskeyPrompt, fmt: str | KVFormat = "full",
                  max_new: int = 10) -> PasskeyTrial:
    """One greedy answer of a held sequence: the prompt prefilled in chunks of the
    engine's ``max_batch_tokens`` (blocks re-stored in ``fmt`` as they fill, so later
    chunks and every decode step read quantized KV), then up to ``max_new`` tokens by
    the decode path (engine.append), stopping at EOS."""
    fmt = _fmt(fmt)
    sid = f"eval-pk-{next(_ids)}"
    ids, step = prompt.ids, engine.config.max_batch_tokens
    out: list[int] = []
    try:
        for c0 in range(0, len(ids), step):
            toks = ids[c0:c0 + step]
            logits = (engine.prefill(sid, toks) if c0 == 0
                      else engine.extend(sid, toks, logits="last")[-1])
            if not fmt.is_full:
                quantize_filled(engine, sid, fmt)
        view = seq_view(engine, sid)
        q_at, n_at = sum(b.fmt == fmt.name for b in view.blocks[:-1]), len(view.blocks)
        tok = int(logits.argmax())
        while True:
            out.append(tok)
            if tok in engine.eos_ids or len(out) >= max_new:
                break
            logits = engine.append([sid], [tok])[0]
            if not fmt.is_full:
                quantize_filled(engine, sid, fmt)
            tok = int(logits.argmax())
        by_fmt = dict(seq_view(engine, sid).bytes_by_format)
    finally:
        if sid in engine.held:
            engine.release(sid)
    tok = engine.tokenizer
    text = tok.decode(out, skip_special_tokens=True) if tok is not None else ""
    return PasskeyTrial(fmt.name, len(ids), prompt.depth, prompt.key, text, prompt.key in text,
                        len(ids), q_at, n_at, by_fmt)


# -- the benchmark ------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(engine, formats: list[str], ppl_lengths: list[int], ppl_windows_n: int,
        passkey_lengths: list[int], n_depths: int, chunk: int, max_new: int,
        seed: int = 1234) -> dict:
    tok = engine.tokenizer
    res: dict = {"ppl": [], "passkey": [], "bytes": {}}
    if ppl_lengths:
        text = ppl_text_ids(tok)
        res["ppl_text_tokens"] = len(text)
        for L in ppl_lengths:
            wins = ppl_windows(text, L, ppl_windows_n)
            for f in formats:
                t0 = time.perf_counter()
                rs = [teacher_forced_nll(engine, w, f, chunk) for _, w in wins]
                nll = torch.cat([r.scored for r in rs]).double()
                nll_all = torch.cat([r.nll for r in rs]).double()
                last = rs[-1]
                row = dict(fmt=_fmt(f).name, length=L, windows=[o for o, _ in wins],
                           scored_tokens=nll.numel(), nll=float(nll.mean()),
                           ppl=math.exp(float(nll.mean())), ppl_all=math.exp(float(nll_all.mean())),
                           per_window_ppl=[r.ppl for r in rs],
                           kv_bytes=last.kv_bytes, kv_bytes_by_format=last.kv_bytes_by_format,
                           quantized_blocks=last.quantized_blocks, num_blocks=last.num_blocks,
                           seconds=time.perf_counter() - t0)
                res["ppl"].append(row)
                log(f"ppl L={L} {row['fmt']}: {row['ppl']:.4f} (all {row['ppl_all']:.4f}) "
                    f"{row['seconds']:.0f}s")
    for f in formats:
        fm = _fmt(f)
        res["bytes"][fm.name] = dict(block_bytes=engine.store.block_bytes(fm),
                                     block_size=engine.store.block_size)
    if passkey_lengths:
        depths = [i / (n_depths - 1) for i in range(n_depths)] if n_depths > 1 else [0.5]
        keys = passkey_keys(passkey_lengths, depths, seed)
        prompts = {(L, i): build_passkey_prompt(tok, L, d, keys[(L, i)])
                   for L in passkey_lengths for i, d in enumerate(depths)}
        for L in passkey_lengths:
            for f in formats:
                t0 = time.perf_counter()
                hits = 0
                for i in range(len(depths)):
                    tr = passkey_trial(engine, prompts[(L, i)], f, max_new)
                    res["passkey"].append(asdict(tr) | {"target_length": L})
                    hits += tr.hit
                log(f"passkey L={L} {_fmt(f).name}: {hits}/{len(depths)} "
                    f"{time.perf_counter() - t0:.0f}s")
    return res


def _pct(x: float) -> str:
    return f"{x * 100:+.2f}%"


def tables(res: dict, formats: list[str]) -> str:
    names = [_fmt(f).name for f in formats]
    ppl = {(r["fmt"], r["length"]): r for r in res["ppl"]}
    lengths = sorted({r["length"] for r in res["ppl"]})
    pk_lengths = sorted({r["target_length"] for r in res["passkey"]})
    pk: dict = {}
    for r in res["passkey"]:
        h, n = pk.get((r["fmt"], r["target_length"]), (0, 0))
        pk[(r["fmt"], r["target_length"])] = (h + r["hit"], n + 1)
    full_block = res["bytes"].get("full", {}).get("block_bytes")
    out = []
    head = ["format", "KV bytes / 1K tok", "vs full"]
    head += [f"PPL @{L} (Δ vs full)" for L in lengths]
    head += [f"passkey @{L}" for L in pk_lengths]
    head += ["goal", "pass?"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    Lmax = lengths[-1] if lengths else None
    for name in names:
        cells = [name]
        r = ppl.get((name, Lmax))
        b = res["bytes"].get(name, {})
        if r is not None:
            cells.append(f"{r['kv_bytes'] * 1024 / r['length'] / 2**20:.2f} MiB")
        else:
            cells.append(f"{b['block_bytes'] * 1024 / b['block_size'] / 2**20:.2f} MiB"
                         if b else "-")
        cells.append(f"{b['block_bytes'] / full_block:.3f}x" if b and full_block else "-")
        deltas = []
        for L in lengths:
            r = ppl.get((name, L))
            f = ppl.get(("full", L))
            if r is None:
                cells.append("-")
                continue
            if f is not None and name != "full":
                d = r["ppl"] / f["ppl"] - 1
                deltas.append(d)
                cells.append(f"{r['ppl']:.3f} ({_pct(d)})")
            else:
                cells.append(f"{r['ppl']:.3f}")
        for L in pk_lengths:
            h, n = pk.get((name, L), (0, 0))
            cells.append(f"{h}/{n}" if n else "-")
        goal, ok = [], True
        if name in PPL_GOALS and deltas:
            goal.append(f"PPL ≤ +{PPL_GOALS[name] * 100:g}%")
            ok &= all(d <= PPL_GOALS[name] for d in deltas)
        if name == "int4" and pk_lengths and ("full", pk_lengths[0]) in pk:
            goal.append("passkey == full")
            ok &= all(pk.get(("int4", L), (None,))[0] == pk.get(("full", L), (None,))[0]
                      for L in pk_lengths)
        cells.append("; ".join(goal) or "-")
        cells.append(("PASS" if ok else "FAIL") if goal else "-")
        out.append("| " + " | ".join(cells) + " |")
    if res["passkey"]:
        out.append("")
        depths = sorted({r["depth"] for r in res["passkey"]})
        out.append("Passkey hits by depth (x = hit, . = miss; depths "
                   + ", ".join(f"{d * 100:.0f}%" for d in depths) + "):")
        out.append("")
        out.append("| format | " + " | ".join(f"@{L}" for L in pk_lengths) + " |")
        out.append("|---|" + "---|" * len(pk_lengths))
        for name in names:
            cells = [name]
            for L in pk_lengths:
                rs = sorted((r for r in res["passkey"]
                             if r["fmt"] == name and r["target_length"] == L),
                            key=lambda r: r["depth"])
                cells.append("`" + "".join("x" if r["hit"] else "." for r in rs) + "`")
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="full,int8,fp8,int4,int2,k4v2")
    ap.add_argument("--ppl-lengths", default="2048,4096")
    ap.add_argument("--ppl-windows", type=int, default=3, help="windows per length")
    ap.add_argument("--passkey-lengths", default="1024,2048,4096")
    ap.add_argument("--depths", type=int, default=10, help="needle depths, 0%%..100%%")
    ap.add_argument("--chunk", type=int, default=256, help="prefill chunk (tokens)")
    ap.add_argument("--new", type=int, default=10, help="generated tokens per passkey try")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", default="", help="also write raw results here")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: full,int4; PPL 1 window of 1024; passkey 1024 x 3 depths")
    a = ap.parse_args(argv)
    if a.quick:
        a.formats, a.ppl_lengths, a.ppl_windows = "full,int4", "1024", 1
        a.passkey_lengths, a.depths = "1024", 3
    torch.set_num_threads(a.threads)
    from engine.engine import Engine, EngineConfig
    formats = [f for f in a.formats.split(",") if f]
    if "full" not in [_fmt(f).name for f in formats]:
        formats = ["full"] + formats  # deltas need the baseline
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    t0 = time.perf_counter()
    eng = Engine(EngineConfig(model=a.model, device=a.device, dtype=a.dtype,
                              block_size=a.block_size, max_batch_tokens=a.chunk,
                              seed=a.seed))
    res = run(eng, formats, ints(a.ppl_lengths), a.ppl_windows, ints(a.passkey_lengths),
              a.depths, a.chunk, a.new, a.seed)
    dt = time.perf_counter() - t0
    used = eng.store.arenas[GPU].alloc.num_slots
    cmd = "python -m benchmarks.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
    res["meta"] = dict(command=cmd, date=datetime.date.today().isoformat(),
                       machine=f"{platform.machine()}, {os.cpu_count()} cores",
                       torch=torch.__version__, threads=a.threads, model=eng.model_name,
                       dtype=str(eng.dtype), block_size=a.block_size, chunk=a.chunk,
                       seconds=dt, slots_left=used)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    print(f"# KV quantization accuracy — model {eng.model_name} ({eng.dtype}, "
          f"{eng.device}), block {a.block_size}, chunk {a.chunk}, torch {torch.__version__}, "
          f"{os.cpu_count()} cores, threads {a.threads}, {dt / 60:.1f} min")
    print()
    print(f"`{cmd}`")
    print()
    if res["ppl"]:
        r0 = res["ppl"][0]
        print(f"PPL: pydoc_data.topics ({res['ppl_text_tokens']} tokens), "
              f"{len(r0['windows'])} windows per length; scored = tokens predicted by rows "
              f"after the first chunk of {a.chunk} ({r0['scored_tokens']} per format at "
              f"{r0['length']}). KV bytes: store accounting of the "
              f"{res['ppl'][-1]['length']}-token window (newest block full precision); "
              "'vs full' = per-block ratio.")
        print()
    print(tables(res, formats))
    if used:
        print(f"\nWARNING: {used} KV slots still allocated after the run")


if __name__ == "__main__":
    main()
