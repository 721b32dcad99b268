"""Train the learned accuracy-cost predictor (`kvctl train` runs this in a child process).

    python -m controller.train record --out traces.jsonl [--model default] [--sequences N]
    python -m controller.train fit --traces traces.jsonl --out model.skops
    python -m controller.train fit --traces long.jsonl --traces short.jsonl --out model.skops

``fit`` holds out whole sequences (moves of one sequence are correlated), fits a
HistGradientBoostingRegressor on log10(KL + 1e-6) over the rest, reports the held-out
error and Spearman rank correlation of predicted vs measured KL next to the heuristic
predictor's on the same rows (averaged over ``--splits`` random splits), then refits on
every row and saves the artifact
(controller/predictors/artifact.py: skops + JSON header, no pickle).
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np

from controller.predictors import artifact as art
from controller.predictors.features import SCHEMA_VERSION, vector

MIN_ROWS = 20


def open_text(path: str | Path, mode: str):
    """A trace file, gzip-compressed when its name ends in .gz."""
    if str(path).endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def _parse(path: Path) -> list[dict]:
    rows = []
    with open_text(path, "r") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                if r.get("schema") != SCHEMA_VERSION:
                    raise ValueError(f"feature schema v{r.get('schema')}, this kvctl "
                                     f"computes v{SCHEMA_VERSION}: record the traces again")
                x, kl = vector(r["features"]), float(r["kl"])
                if not np.isfinite(x).all() or not np.isfinite(kl) or kl < 0:
                    raise ValueError("a feature or the KL is not finite, or the KL is negative")
                str(r["model"]), str(r["strategy"])
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                raise ValueError(f"{path}:{n}: not a kvctl trace row: {what}") from None
            rows.append(r)
    return rows


def read_traces(path: str | Path) -> list[dict]:
    """Rows of one trace file (JSON lines, .gz allowed), each checked."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"traces file {path} does not exist; record one with "
                         "`kvctl train record --out FILE`")
    try:
        rows = _parse(path)
    except (OSError, EOFError, UnicodeDecodeError) as e:   # damaged or not text/gzip
        raise ValueError(f"cannot read traces from {path}: {e}") from None
    models = {r["model"] for r in rows}
    if len(models) > 1:
        raise ValueError(f"{path} mixes traces of several models: {sorted(models)}")
    if len(rows) < MIN_ROWS:
        raise ValueError(f"{path} has {len(rows)} trace rows; fitting needs >= {MIN_ROWS}")
    return rows


def _target(kl) -> np.ndarray:
    return np.log10(np.asarray(kl, dtype=np.float64) + art.KL_FLOOR)


def make_model(seed: int = 0):
    from sklearn.ensemble import HistGradientBoostingRegressor

    # small trees, many of them, slow learning: a few hundred to a few thousand rows
    return HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, max_leaf_nodes=15,
                                         min_samples_leaf=8, l2_regularization=1.0,
                                         random_state=seed)


def scores(kl: np.ndarray, pred: np.ndarray, groups: np.ndarray,
           freed: np.ndarray) -> dict[str, float]:
    """Spearman over all rows; within each sequence, of cost and of cost per byte freed
    (what the policy loop ranks one sequence's moves by); mean absolute error of
    log10(KL + floor)."""
    from scipy.stats import spearmanr

    def within(a, b):
        rs = [spearmanr(a[groups == g], b[groups == g]).statistic
              for g in np.unique(groups) if (groups == g).sum() >= 3]
        rs = [r for r in rs if np.isfinite(r)]
        return float(np.mean(rs)) if rs else float("nan")

    return {"spearman": float(spearmanr(kl, pred).statistic),
            "spearman_within_sequence": within(kl, pred),
            "spearman_per_byte_within": within(kl / freed, pred / freed),
            "mae_log10": float(np.mean(np.abs(_target(kl) - _target(pred))))}


def fit(rows: list[dict], holdout: float = 0.25, seed: int = 0,
        splits: int = 1) -> tuple[art.Artifact, dict]:
    """A predictor of one member: held-out scores averaged over ``splits`` random splits
    by sequence, then the model refitted on every row."""
    a, reports = fit_members([rows], holdout, seed, splits)
    return a, reports[0]


def fit_members(groups: list[list[dict]], holdout: float = 0.25, seed: int = 0,
                splits: int = 1) -> tuple[art.Artifact, list[dict]]:
    """A predictor with one member per group of rows, in order (the first member that
    holds a move in its ranges prices it), and each member's report."""
    if not groups or not all(groups):
        raise ValueError("every member needs trace rows")
    if len({r["model"] for g in groups for r in g}) > 1:
        raise ValueError("the trace files are of different models")
    fitted = [_fit_member(g, holdout, seed, splits) for g in groups]
    import sklearn

    return (art.Artifact(groups[0][0]["model"], [m for m, _ in fitted],
                         {"sklearn": sklearn.__version__}), [r for _, r in fitted])


def _fit_member(rows: list[dict], holdout: float, seed: int,
                splits: int) -> tuple[art.Member, dict]:
    X = np.array([vector(r["features"]) for r in rows])
    kl = np.array([float(r["kl"]) for r in rows])
    heur = np.array([float(r.get("heuristic", np.nan)) for r in rows])
    groups = np.array([int(r.get("seq", 0)) for r in rows])
    freed = np.array([max(1, int(r.get("freed_bytes", 1))) for r in rows], dtype=np.float64)
    seqs = np.unique(groups)
    n_test = max(1, int(round(holdout * len(seqs)))) if len(seqs) > 1 and holdout else 0
    report: dict = {"rows": len(rows), "sequences": int(len(seqs)), "splits": 0,
                    "heldout_rows": 0, "heldout_sequences": n_test}
    runs: dict[str, list[dict]] = {"learned": [], "heuristic": []}
    for k in range(splits if n_test else 0):
        rng = np.random.default_rng(seed + k)
        test_seqs = set(rng.permutation(seqs)[:n_test].tolist())
        test = np.array([g in test_seqs for g in groups])
        if (~test).sum() < MIN_ROWS // 2:
            break
        m = make_model(seed).fit(X[~test], _target(kl[~test]))
        pred = np.maximum(0.0, 10.0 ** m.predict(X[test]) - art.KL_FLOOR)
        runs["learned"].append(scores(kl[test], pred, groups[test], freed[test]))
        if np.isfinite(heur[test]).all():
            runs["heuristic"].append(scores(kl[test], heur[test], groups[test], freed[test]))
        report["splits"] += 1
        report["heldout_rows"] += int(test.sum())
    for name, rs in runs.items():
        if rs and len(rs) == report["splits"]:
            report[name] = {key: float(np.mean([r[key] for r in rs])) for key in rs[0]}
    if report["splits"]:
        report["heldout_rows"] = round(report["heldout_rows"] / report["splits"])
    model = make_model(seed).fit(X, _target(kl))      # the shipped model sees every row
    info = {"trained_on": {k: report[k] for k in ("rows", "sequences")},
            "heldout": {k: report[k] for k in ("learned", "heuristic") if k in report}}
    return art.Member(model, X.min(0), X.max(0), sorted({r["strategy"] for r in rows}),
                      info), report


def print_report(rep: dict, out=sys.stdout) -> None:
    print(f"{rep['rows']} rows from {rep['sequences']} sequences; held out "
          f"{rep['heldout_sequences']} sequences (~{rep['heldout_rows']} rows) in each of "
          f"{rep['splits']} random splits; scores are means over the splits", file=out)
    if "learned" not in rep:
        print("too few sequences to hold any out: no held-out scores", file=out)
        return
    print(f"{'predictor':<10} {'spearman':>9} {'within-seq':>11} {'per-byte':>9} "
          f"{'MAE log10 KL':>13}", file=out)
    for name in ("learned", "heuristic"):
        if name in rep:
            s = rep[name]
            print(f"{name:<10} {s['spearman']:>9.3f} {s['spearman_within_sequence']:>11.3f} "
                  f"{s['spearman_per_byte_within']:>9.3f} {s['mae_log10']:>13.3f}", file=out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvctl train", description="Record cost traces on the "
                                 "engine; fit and save the learned accuracy-cost predictor.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{record,fit}")
    r = sub.add_parser("record", help="record traces on the engine (slow on CPU)")
    r.add_argument("--out", required=True, help="JSON-lines file to write (.gz: compressed)")
    r.add_argument("--model", default="default", help="'default', a local HF dir, 'random:tiny'")
    r.add_argument("--sequences", type=int, default=24)
    r.add_argument("--min-tokens", type=int, default=256)
    r.add_argument("--max-tokens", type=int, default=2048)
    r.add_argument("--horizon", type=int, default=24, help="teacher-forced tokens scored")
    r.add_argument("--targets", type=int, default=3, help="byte targets per strategy")
    r.add_argument("--block-size", type=int, default=32, help="as the serving engine's")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--warmup", type=int, default=8,
                   help="decode steps before the moves (0: right after the prefill)")
    r.add_argument("--prompts", default="text", choices=("text", "haystack"),
                   help="pydoc prose, or filler with two facts and a question (retrieval-shaped)")
    f = sub.add_parser("fit", help="fit the predictor on traces and save it")
    f.add_argument("--traces", required=True, nargs="+", action="append",
                   help="JSON-lines trace files; repeat --traces for a predictor of several "
                        "members, one per --traces, the first that holds a move prices it")
    f.add_argument("--out", required=True, help="predictor file to write (.skops)")
    f.add_argument("--holdout", type=float, default=0.25, help="share of sequences held out")
    f.add_argument("--splits", type=int, default=5, help="held-out splits to average")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--json", action="store_true", help="print the report as JSON")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "record":
            from controller.traces import RecordConfig, record   # torch loads here

            cfg = RecordConfig(model=a.model, sequences=a.sequences, min_tokens=a.min_tokens,
                               max_tokens=a.max_tokens, horizon=a.horizon, targets=a.targets,
                               block_size=a.block_size, threads=a.threads, seed=a.seed,
                               prompts=a.prompts, warmup=a.warmup)
            with open_text(a.out, "w") as out:
                n = record(cfg, out)
            print(f"wrote {n} trace rows to {a.out}")
            return 0
        if not 0 <= a.holdout < 1:
            raise ValueError(f"--holdout must be in [0, 1), got {a.holdout}")
        if a.splits < 1:
            raise ValueError(f"--splits must be >= 1, got {a.splits}")
        groups = []
        for paths in a.traces:
            rows = []
            for i, path in enumerate(paths):  # sequence ids stay distinct across files
                for row in read_traces(path):
                    row["seq"] = i * 1_000_000 + int(row.get("seq", 0))
                    rows.append(row)
            groups.append(rows)
        artifact, reps = fit_members(groups, a.holdout, a.seed, a.splits)
        art.save(artifact, a.out)
        if a.json:
            print(json.dumps(reps[0] if len(reps) == 1 else reps, indent=2))
        else:
            for k, (paths, rep) in enumerate(zip(a.traces, reps)):
                if len(reps) > 1:
                    print(f"member {k + 1} ({', '.join(paths)}):")
                print_report(rep)
            print(f"saved the predictor for {artifact.model_id!r} to {a.out}")
        return 0
    except (ValueError, OSError) as e:
        print(f"kvctl train: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
