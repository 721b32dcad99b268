"""Scores, the markdown table, the issue's accuracy-side checks and the plots, from the
records both sides write (one record = one config on one sample)."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

BYTES_TOL = 0.005        # "the same bytes": within half a percentage point of fp16 bytes


def accuracy(rec: dict) -> float:
    """Retrieval: 1 when every scored group (each key) was the argmax throughout, else
    0. Text: the share of scored tokens that were the argmax (top-1)."""
    at = {p: i for i, p in enumerate(rec["scored"])}
    ok = [all(rec["correct"][at[p]] for p in g) for g in rec["groups"]]
    if rec["task"] == "text":
        return sum(ok) / max(1, len(ok))
    return float(all(ok))


def keys_right(rec: dict) -> float:
    """The share of scored groups (keys; text: tokens) that were right."""
    at = {p: i for i, p in enumerate(rec["scored"])}
    ok = [all(rec["correct"][at[p]] for p in g) for g in rec["groups"]]
    return sum(ok) / max(1, len(ok))


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def cells(records: list[dict]) -> list[dict]:
    """One row per (config, task, length) and per (config, task) over all lengths
    (length 0)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["config"], r["task"], r["length"])].append(r)
        groups[(r["config"], r["task"], 0)].append(r)
    out = []
    for (config, task, length), rs in groups.items():
        r0 = rs[0]
        nll = [x for r in rs for x in r["nll"]]
        row = dict(config=config, family=r0["family"], side=r0["side"], kind=r0["kind"],
                   strategy=r0["strategy"], budget=r0["budget"], host=r0["host"], task=task,
                   length=length, n=len(rs), accuracy=_mean(accuracy(r) for r in rs),
                   keys=_mean(keys_right(r) for r in rs),
                   nll=_mean(nll), ppl=math.exp(_mean(nll)) if nll else float("nan"),
                   kl=_mean(x for r in rs for x in r["kl"]), read=_mean(r["read"] for r in rs),
                   gpu=_mean(r["gpu"] for r in rs),
                   peak_gpu=max(r.get("peak_gpu", r["gpu"]) for r in rs),
                   errors=sorted({r["error"] for r in rs if r.get("error")}))
        if r0["kind"] == "adaptive":
            row["predictor"] = "/".join(sorted({r["predictor"] for r in rs}))
            row["predictor_calls"] = sum(r["predictor_calls"] for r in rs)
            row["predictor_fallbacks"] = sum(r["predictor_fallbacks"] for r in rs)
            row["unmet"] = sum(len(r["unmet"]) for r in rs)
        out.append(row)
    return out


def _order(row: dict) -> tuple:
    side = {"full": 0, "fixed": 1, "adaptive": 2}.get(row["kind"], 3) + (
        3 if row["side"] == "peer" else 0)
    return (side, row["family"], -row["budget"])


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.1%}"


def must_show(rows: list[dict], profile: str = "balanced") -> list[dict]:
    """The issue's accuracy-side claims, checked on these rows (lengths pooled)."""
    pooled = [r for r in rows if r["length"] == 0]
    tasks = sorted({r["task"] for r in pooled})
    fam = f"adaptive {profile}"
    checks = []

    def cell(config: str, task: str):
        return next((r for r in pooled if r["config"] == config and r["task"] == task), None)

    for task in tasks:
        a = cell(f"{fam} @25.0%", task)
        if a is None:
            checks.append(dict(claim=f"{task}: adaptive at 25% >= every fixed strategy and "
                                     "peer at the same or more bytes", status="N/A",
                               detail=f"'{fam} @25.0%' did not run"))
            continue
        rivals = [r for r in pooled if r["task"] == task and r["kind"] not in
                  ("full", "adaptive") and r["read"] >= a["read"] - BYTES_TOL]
        beat = [r for r in rivals if r["accuracy"] > a["accuracy"]]
        checks.append(dict(
            claim=f"{task}: {fam} at 25% (reads {_pct(a['read'])}, accuracy "
                  f"{a['accuracy']:.3f}) >= every fixed strategy and peer reading as much "
                  f"or more ({len(rivals)} configs)",
            status="PASS" if not beat else "FAIL",
            detail="; ".join(f"{r['config']} {r['accuracy']:.3f} at {_pct(r['read'])}"
                             for r in sorted(beat, key=lambda r: -r["accuracy"])) or "-"))
        if task == "text":    # top-1 over a few hundred tokens moves by chance: KL too
            worse = [r for r in rivals if r["kl"] < a["kl"]]
            checks.append(dict(
                claim=f"text: {fam} at 25% KL to full ({a['kl']:.4f}) <= every fixed "
                      "strategy and peer reading as much or more",
                status="PASS" if not worse else "FAIL",
                detail="; ".join(f"{r['config']} {r['kl']:.4f} at {_pct(r['read'])}"
                                 for r in sorted(worse, key=lambda r: r["kl"])) or "-"))
        i4 = [r for r in pooled if r["task"] == task and r["family"] == "kvctl quantize_int4"]
        if i4:
            best = max(i4, key=lambda r: r["accuracy"])
            checks.append(dict(
                claim=f"{task}: {fam} at 25% >= kvctl's fixed int4 (reads "
                      f"{_pct(best['read'])})",
                status="PASS" if a["accuracy"] >= best["accuracy"] else "FAIL",
                detail=f"{a['accuracy']:.3f} vs {best['accuracy']:.3f}"))
        lo, full = cell(f"{fam} @12.5%", task), cell("full", task)
        if lo is not None and full is not None:
            checks.append(dict(
                claim=f"{task}: {fam} at 12.5% >= half of full-cache accuracy",
                status="PASS" if lo["accuracy"] >= 0.5 * full["accuracy"] else "FAIL",
                detail=f"{lo['accuracy']:.3f} (reads {_pct(lo['read'])}) vs full "
                       f"{full['accuracy']:.3f}"))
    ad = [r for r in pooled if r["kind"] == "adaptive" and r["predictor"] == "learned"]
    calls = sum(r["predictor_calls"] for r in ad)
    fb = sum(r["predictor_fallbacks"] for r in ad)
    checks.append(dict(claim="learned-predictor fallbacks under 5% of calls (every adaptive "
                             "run)", status=("N/A" if not calls else
                                             "PASS" if fb < 0.05 * calls else "FAIL"),
                       detail=f"{fb}/{calls}" + (f" = {fb / calls:.0%}" if calls else
                                                 " (no learned predictor for this model)")))
    for claim in ("GPU workload: adaptive at least as fast as the fastest fixed strategy "
                  "meeting the budget, 0 OOM, 0 lost", "GPU capacity: int4 >= 3x, adaptive "
                  ">= 4x full at 32K"):
        checks.append(dict(claim=claim, status="N/A",
                           detail="speed side: benchmarks.headline.gpu, not run here"))
    return checks


def summary(rows: list[dict]) -> list[str]:
    """One row a config, lengths pooled: accuracy per task with the bytes read (text:
    top-1 and KL to full)."""
    pooled = [r for r in rows if r["length"] == 0]
    tasks = sorted({r["task"] for r in pooled})
    head = ["config"] + [("text top-1 / KL" if t == "text" else
                          "two needles both / keys" if t == "two_needles" else t)
                         + " (reads)" for t in tasks]
    out = ["## Summary (lengths pooled)", "", "| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
    by = {(r["config"], r["task"]): r for r in pooled}
    for config in dict.fromkeys(r["config"] for r in sorted(pooled, key=_order)):
        cellv = [config]
        for t in tasks:
            r = by.get((config, t))
            if r is None:
                cellv.append("-")
            elif t == "text":
                cellv.append(f"{r['accuracy']:.3f} / {r['kl']:.4f} ({_pct(r['read'])})")
            elif t == "two_needles":
                cellv.append(f"{r['accuracy']:.3f} / {r['keys']:.3f} ({_pct(r['read'])})")
            else:
                cellv.append(f"{r['accuracy']:.3f} ({_pct(r['read'])})")
        out.append("| " + " | ".join(cellv) + " |")
    return out


def markdown(res: dict) -> str:
    meta, rows = res["meta"], res["cells"]
    lengths = sorted({r["length"] for r in rows if r["length"]})
    asked = ("ending the compressed context" if meta.get("question") == "context"
             else "after compression (compress, then ask)")
    out = [f"# Headline suite — accuracy side ({meta['model']}, {meta['dtype']}, "
           f"{meta['device']}, {meta['threads']} thread(s))", "",
           f"`{meta['command']}`", "",
           f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, transformers "
           f"{meta['transformers']}; peers: {meta.get('peer_versions') or 'not run'}; "
           f"retrieval questions {asked}; "
           f"{meta['seconds'] / 60:.1f} min. Samples per task and length: "
           f"{meta['samples']}; budgets {', '.join(_pct(b) for b in meta['budgets'])} of "
           "the context's fp16 KV bytes.", "",
           "Accuracy: passkey / two_needles = share of samples whose key(s) were the "
           "argmax at every digit (`keys right`: the share of keys); text = top-1 share "
           "of the scored tokens. `reads` = "
           "bytes attention reads at the answer / the same tokens at 16 bits (offloaded "
           "blocks count: they are still read); `GPU` = bytes held on the GPU tier. "
           "KL(full || config) per scored token, nats.", ""]
    out += summary(rows) + [""]
    for task in sorted({r["task"] for r in rows}):
        head = ["config", "budget", "reads", "GPU"] + [f"acc @{L}" for L in lengths] + [
            "acc (all)", "keys right" if task == "two_needles" else "", "NLL",
            "PPL" if task == "text" else "", "KL", "n"]
        head = [h for h in head if h]
        out += [f"## {task}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        pooled = sorted((r for r in rows if r["task"] == task and r["length"] == 0),
                        key=_order)
        for r in pooled:
            by_len = {x["length"]: x for x in rows if x["config"] == r["config"]
                      and x["task"] == task and x["length"]}
            cellv = [r["config"] + (" ⚠ " + "; ".join(r["errors"]) if r["errors"] else ""),
                     "-" if r["kind"] == "full" else _pct(r["budget"]), _pct(r["read"]),
                     _pct(r["gpu"])]
            cellv += [f"{by_len[L]['accuracy']:.3f}" if L in by_len else "-" for L in lengths]
            cellv.append(f"**{r['accuracy']:.3f}**")
            if task == "two_needles":
                cellv.append(f"{r['keys']:.3f}")
            cellv.append(f"{r['nll']:.3f}")
            if task == "text":
                cellv.append(f"{r['ppl']:.2f}")
            cellv += [f"{r['kl']:.4f}", str(r["n"])]
            out.append("| " + " | ".join(cellv) + " |")
        out.append("")
    ad = sorted((r for r in rows if r["kind"] == "adaptive" and r["length"] == 0),
                key=_order)
    if ad:
        out += ["## The policy's moves", "",
                "| config | task | predictor | fallbacks / priced moves | 'unmet' decisions "
                "| peak GPU |", "|---|---|---|---|---|---|"]
        for r in ad:
            out.append(f"| {r['config']} | {r['task']} | {r['predictor']} | "
                       f"{r['predictor_fallbacks']}/{r['predictor_calls']} | {r['unmet']} | "
                       f"{_pct(r['peak_gpu'])} |")
        out.append("")
    out += ["## Not run", ""]
    if res["not_run"]:
        out += [f"- {name}: {why}" for name, why in sorted(res["not_run"].items())]
    else:
        out.append("- nothing: every config asked for ran")
    out += ["", "## The issue's claims at this scale", "", "| claim | status | detail |",
            "|---|---|---|"]
    out += [f"| {c['claim']} | {c['status']} | {c['detail']} |" for c in res["must_show"]]
    out.append("")
    return "\n".join(out)


def plots(res: dict, out_dir: Path) -> list[str]:
    """accuracy_vs_bytes.png (one panel a task) and timeline.png; returns the files."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["cells"] if r["length"] == 0]
    tasks = sorted({r["task"] for r in rows})
    files = []
    families = sorted({r["family"] for r in rows if r["kind"] != "full"})
    colors = {f: plt.get_cmap("tab20")(i % 20) for i, f in enumerate(families)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 5.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        fams = defaultdict(list)
        for r in rows:
            if r["task"] == task:
                fams[r["family"]].append(r)
        for fam, rs in sorted(fams.items()):
            rs.sort(key=lambda r: r["read"])
            x, y = [r["read"] * 100 for r in rs], [r["accuracy"] for r in rs]
            kind = rs[0]["kind"]
            if kind == "full" and rs[0]["side"] == "peer":
                ax.plot(x, y, "^", color="grey", ms=10, label=fam, zorder=9)
            elif kind == "full":
                ax.axhline(y[0], color="black", ls=":", lw=1)
                ax.plot(x, y, "k*", ms=14, label="full", zorder=10)
            elif kind == "adaptive":
                ax.plot(x, y, "-s", lw=2.5, ms=8, label=fam, color=colors[fam], zorder=5)
            elif rs[0]["side"] == "peer":
                ax.plot(x, y, "--^", lw=1, ms=6, label=fam, color=colors[fam])
            else:
                ax.plot(x, y, "-o", lw=1, ms=5, label=fam, color=colors[fam])
        ax.set_xscale("log")
        ax.set_xlabel("bytes attention reads, % of fp16 KV (log)")
        ax.set_ylabel("accuracy" + (" (top-1)" if task == "text" else " (keys right)"))
        ax.set_title(task)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.18, 1, 1))
    p = out_dir / "accuracy_vs_bytes.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p.name)
    tl = _timeline_record(res["records"])
    if tl is not None:
        rec, points = tl
        kinds = sorted({k for pt in points for k in pt["blocks"]},
                       key=lambda k: ["full", "int8", "int4", "k4v2", "int2"].index(k)
                       if k in ("full", "int8", "int4", "k4v2", "int2") else 9)
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.stackplot(range(len(points)), *[[pt["blocks"].get(k, 0) for pt in points]
                                           for k in kinds], labels=kinds)
        ax.set_xlabel("point (0: as prefilled; then each controller tick, one a decode step "
                      "once the context is compressed)")
        ax.set_ylabel("blocks")
        ax.set_title(f"{rec['config']} on {rec['sample']}: blocks by format / tier")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        p = out_dir / "timeline.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p.name)
    return files


def _timeline_record(records: list[dict]):
    """One adaptive run: the default profile's first, at the smallest budget and the
    longest context, with the most moves."""
    best = None
    for r in records:
        pts = r.get("timeline")
        if not pts:
            continue
        key = (r["strategy"] == "balanced", not r["host"], -r["budget"], r["length"],
               len(r.get("actions", [])))
        if best is None or key > best[0]:
            best = (key, r, pts)
    return None if best is None else (best[1], best[2])
