"""The learned predictor: features, traces, fitting, the artifact format and its checks,
fallback to the heuristic, the policy loop's choice of predictor, and `kvctl train`."""
import functools
import gzip
import io
import itertools
import json
import pickle
import subprocess
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from controller.predictors import artifact as art
from controller.predictors.counters import FALLBACKS
from controller.predictors.features import SCHEMA, candidate_features, vector
from controller.predictors.heuristic import HeuristicPredictor
from controller.predictors.learned import LearnedPredictor, artifact_path, predictor_for
from controller.strategies import (ColdOffload, ColdQuantization, Context, HeavyHitterEviction,
                                   SinkWindowEviction)
from controller.train import fit, fit_members, read_traces, scores
from engine.actions import BlockView, SequenceView
from tests.controller.helpers import KVCTL, ROOT, child_env

FULL, INT8 = 1000, 520
CTX = Context({"full": FULL, "int8": INT8, "int4": 280, "int2": 160, "k4v2": 220,
               "k8v4": 400}, num_sink_blocks=1)
MASS = [0.4, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.2, 0.26]


def view(mass=MASS, fmt="full") -> SequenceView:
    blocks = [BlockView(i, 32, fmt if 0 < i < len(mass) - 1 else "full", "gpu", FULL, m,
                        observed=m) for i, m in enumerate(mass)]
    return SequenceView("s", "decode", 300, 32 * len(mass), 20, 0, "exact", 0,
                        {"gpu": FULL * len(mass)}, {"full": FULL * len(mass)}, blocks,
                        entropy=1.5, sink_mass=0.4, recent_mass=0.46)


# ---------------------------------------------------------------- features
def test_features_of_a_cold_int8_move():
    seq = view()
    c = ColdQuantization(8).propose(seq, 2 * (FULL - INT8), CTX)
    assert c.blocks == (1, 2)                      # the two coldest, lowest index first
    f = candidate_features(seq, c)
    assert list(f) == list(SCHEMA) and len(vector(f)) == len(SCHEMA)
    assert (f["is_quantize"], f["is_evict"], f["is_offload"]) == (1, 0, 0)
    assert (f["k_bits_after"], f["v_bits_after"], f["topk_keep"]) == (8, 8, 1)
    assert f["mass_frac"] == pytest.approx(0.04) and f["share"] == pytest.approx(0.2)
    assert f["heat"] == pytest.approx(0.2) and f["touches_sink"] == 0
    assert f["min_dist_blocks"] == 7 and f["mean_dist_frac"] == pytest.approx(0.75)
    assert f["freed_frac"] == pytest.approx(2 * (FULL - INT8) / (10 * FULL))
    assert f["log2_tokens"] == pytest.approx(np.log2(320)) and f["already_lowered"] == 0


def test_features_of_eviction_topk_and_lowered_blocks():
    seq = view()
    ev = SinkWindowEviction().propose(seq, 8 * FULL, CTX)
    f = candidate_features(seq, ev)
    assert f["is_evict"] == 1 and f["k_bits_after"] == 0 and f["touches_sink"] == 0
    assert f["mass_frac"] == pytest.approx(sum(MASS[1:9]))
    tk = ColdOffload(top_k_fraction=0.25).propose(seq, 4 * FULL, CTX)
    g = candidate_features(seq, tk)
    assert g["is_topk"] == 1 and g["topk_keep"] == pytest.approx(1 / 4)
    low = candidate_features(view(fmt="int8"), SinkWindowEviction().propose(
        view(fmt="int8"), 1, CTX))
    assert low["already_lowered"] == 1 and low["k_bits_after"] == 0
    # lossy blocks are evicted, never quantized again: int4 takes the full ones only
    assert ColdQuantization(4).propose(view(fmt="int8"), 10 * FULL, CTX).blocks == (0,)
    with pytest.raises(ValueError, match="missing"):
        vector({k: 0.0 for k in SCHEMA[1:]})


def test_block_distances_are_fractions_of_the_sequence_after_evictions():
    """After a plan evicted most blocks, a move on the old blocks left is still at most 1
    block-length away per block (distances count evicted blocks, so the fraction must
    too): over the attended blocks it reached 2.0 and the learned predictor fell back on
    every move after the first eviction (docs/BENCHMARKS.md, "Two ladders")."""
    mass = [0.3] + [0.01] * 20 + [0.2, 0.4]
    blocks = [BlockView(i, 32, "full", "evicted" if 2 <= i <= 17 else "gpu", FULL, m,
                        observed=m) for i, m in enumerate(mass)]
    n_gpu = sum(b.tier == "gpu" for b in blocks)
    seq = SequenceView("s", "decode", 700, 32 * len(mass), 20, 0, "exact", 0,
                       {"gpu": FULL * n_gpu}, {"full": FULL * n_gpu}, blocks,
                       entropy=1.5, sink_mass=0.3, recent_mass=0.6)
    c = ColdQuantization(4).propose(seq, FULL, CTX)
    f = candidate_features(seq, c)
    dists = [22 - i for i in c.blocks]
    assert f["mean_dist_frac"] == pytest.approx(sum(dists) / len(dists) / 23)
    assert 0 < f["mean_dist_frac"] <= 1


# ---------------------------------------------------------------- traces + fit
HORIZON = 8   # teacher-forced steps each trace row compares


@pytest.fixture(scope="module")
def tiny_traces(tmp_path_factory):
    """Real traces of the 2-layer random model (a few seconds)."""
    from controller.traces import RecordConfig, record

    path = tmp_path_factory.mktemp("traces") / "tiny.jsonl"
    with path.open("w") as f:
        # block size and lengths as the policy-loop tests' tiny engine has them
        n = record(RecordConfig(model="random:tiny", sequences=8, min_tokens=100,
                                max_tokens=400, horizon=HORIZON, seed=3, prior_share=0.4,
                                block_size=4),
                   f, log=io.StringIO())
    assert n > 8 * 9
    return path


def test_traces_right_after_the_prefill_use_prompt_time_statistics(tmp_path):
    """``--warmup 0``: the moves are measured at the moment a relief right after a
    prefill decides, on the statistics the prompt seeded (not zeros: the learned model
    would leave all of them to the heuristic)."""
    from controller.traces import RecordConfig, record

    path = tmp_path / "t.jsonl"
    with path.open("w") as f:
        n = record(RecordConfig(model="random:tiny", sequences=1, min_tokens=120,
                                max_tokens=120, horizon=4, warmup=0, seed=5, prior_share=0,
                                block_size=4), f, log=io.StringIO())
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert n == len(rows) > 5 and {r["warmup"] for r in rows} == {0}
    assert all(r["tokens"] == 120 for r in rows)          # no decode step before the moves
    assert all(r["features"]["entropy_norm"] > 0 and r["features"]["sink_mass"] > 0
               for r in rows)
    with pytest.raises(ValueError, match="--warmup"):
        RecordConfig(warmup=-1)


def test_haystack_prompts_ask_about_a_fact_they_hold():
    """``--prompts haystack``: n prompt tokens of filler holding two facts, ending in a
    question about one; the answer (its number) comes first after the prompt."""
    import random
    from types import SimpleNamespace

    from controller.traces import RecordConfig, haystack_window
    enc = lambda text, add_special_tokens=False: {"input_ids": [ord(c) for c in text]}  # noqa: E731
    eng = SimpleNamespace(tokenizer=enc)
    for seed, n in ((0, 700), (1, 1333), (2, 4001)):
        ids = haystack_window(eng, n, 32, random.Random(seed))
        assert len(ids) == n + 32
        prompt, after = "".join(map(chr, ids[:n])), "".join(map(chr, ids[n:]))
        name = prompt.rsplit("what is the ", 1)[1].split(" number?")[0]
        code = prompt.split(f"the {name} number is ", 1)[1][:5]
        assert code.isdigit() and after.startswith(f" {code}.")
        assert prompt.count(" number is") == 3           # two facts and the question
    with pytest.raises(ValueError, match="tokenizer"):
        haystack_window(SimpleNamespace(tokenizer=None), 700, 32, random.Random(0))
    with pytest.raises(ValueError, match="--prompts"):
        RecordConfig(prompts="poems")


def test_traces_measure_what_moves_cost(tiny_traces, tmp_path):
    rows = read_traces(tiny_traces)
    gz = tmp_path / "t.jsonl.gz"
    gz.write_bytes(gzip.compress(tiny_traces.read_bytes()))
    assert read_traces(gz) == rows
    assert {r["strategy"] for r in rows} >= {"quantize_int8", "quantize_int2", "sink_window",
                                             "offload_exact", "offload_topk", "heavy_hitter"}
    assert all(set(r["features"]) == set(SCHEMA) for r in rows)
    # top-1 agreement is a share of the HORIZON steps compared: a whole number of them
    assert all(r["top1"] * HORIZON == round(r["top1"] * HORIZON) for r in rows)
    # offload_exact moves the bytes unchanged: lossless. Its KL is not always exactly 0:
    # attention over the offloaded blocks reduces in another order, and with transformers
    # 5.25 a few rows measured KL ~3e-15 (float rounding). The tolerance sits between
    # that and the mildest lossy move here (int8 quantization: 4e-9 and up)
    exact = [r for r in rows if r["strategy"] == "offload_exact"]
    assert exact and all(r["kl"] < 1e-12 and r["kl_max"] < 1e-12 and r["top1"] == 1
                         for r in exact)
    assert all(r["kl"] > 1e-12 for r in rows if r["strategy"].startswith("quantize_"))
    assert any(r["prior"] for r in rows) and any(r["features"]["already_lowered"] > 0
                                                 for r in rows)
    # earlier moves include the policy's own plan, not only cold quantizations
    assert any((r["prior"] or "").startswith("mixed_precision@") for r in rows)
    # a plan's parts are measured alone too (the learned predictor may price them so)
    parts = [r for r in rows if r["part_of"] == "mixed_precision"]
    assert parts and all(r["strategy"].startswith("quantize_") or r["strategy"] == "heavy_hitter"
                         for r in parts)
    by = {}
    for r in rows:     # the same blocks at lower precision cost more
        by.setdefault((r["seq"], r["target_frac"], r["num_touched"]), {})[r["strategy"]] = r["kl"]
    pairs = [(d["quantize_int8"], d["quantize_int2"]) for d in by.values()
             if "quantize_int8" in d and "quantize_int2" in d]
    assert pairs and all(a < b for a, b in pairs)


def test_compare_matches_an_independent_reference():
    """KL(ref || moved), top-1 agreement and NLL change of the trace rows, against numpy
    in float64 over random logits; rows 1 and 4 of ``moved`` have another argmax."""
    from controller.traces import compare

    g = np.random.default_rng(5)
    ref = (g.normal(size=(6, 11)) * 2).astype(np.float32)
    moved = ref + (g.normal(size=ref.shape) * 0.3).astype(np.float32)
    for i in (1, 4):
        moved[i, ref[i].argmax()] = ref[i].min() - 1
    targets = [3, 0, 10, 7, 5]
    got = compare(torch.from_numpy(ref), torch.from_numpy(moved), targets)
    ref, moved = ref.astype(np.float64), moved.astype(np.float64)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(moved)
    kl = [sum(np.exp(lp[i, j]) * (lp[i, j] - lq[i, j]) for j in range(11)) for i in range(6)]
    nll = np.mean([lp[i, t] - lq[i, t] for i, t in enumerate(targets)])
    assert got["top1"] == 4 / 6
    assert got["kl"] == pytest.approx(np.mean(kl), rel=1e-9)
    assert got["kl_max"] == pytest.approx(max(kl), rel=1e-9)
    assert got["nll_delta"] == pytest.approx(nll, rel=1e-9)
    same = compare(torch.from_numpy(moved), torch.from_numpy(moved), targets)
    assert same == {"kl": 0.0, "kl_max": 0.0, "top1": 1.0, "nll_delta": 0.0}


def _spearman(a, b) -> float:
    """Pearson correlation of the ranks (ties share their mean rank)."""
    from scipy.stats import rankdata
    return float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])


def _reference_scores(rows, pred) -> dict[str, float]:
    """train.scores written out directly: Spearman over all rows, mean Spearman within
    each sequence of >= 3 rows, of KL and of KL per byte freed; MAE of log10(KL + 1e-6)."""
    kl = np.array([r["kl"] for r in rows])
    freed = np.array([max(1, r["freed_bytes"]) for r in rows], dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    within, per_byte = [], []
    for seq in sorted({r["seq"] for r in rows}):
        i = [k for k, r in enumerate(rows) if r["seq"] == seq]
        if len(i) >= 3:
            within.append(_spearman(kl[i], pred[i]))
            per_byte.append(_spearman(kl[i] / freed[i], pred[i] / freed[i]))
    return {"spearman": _spearman(kl, pred), "spearman_within_sequence": np.mean(within),
            "spearman_per_byte_within": np.mean(per_byte),
            "mae_log10": np.mean(np.abs(np.log10(kl + 1e-6) - np.log10(pred + 1e-6)))}


def test_scores_match_an_independent_reference():
    g = np.random.default_rng(11)
    rows = [{"seq": s, "kl": float(k), "freed_bytes": int(f)}
            for s, k, f in zip([0] * 5 + [1] * 4 + [2] * 2, 10 ** g.uniform(-7, -2, 11),
                               g.integers(1, 5, 11) * 1000)]
    pred = 10 ** g.uniform(-7, -2, 11)
    pred[:2] = pred[2]                                     # ties
    got = scores(np.array([r["kl"] for r in rows]), pred, np.array([r["seq"] for r in rows]),
                 np.array([r["freed_bytes"] for r in rows], dtype=np.float64))
    assert got == pytest.approx(_reference_scores(rows, pred), rel=1e-9)
    kl = np.array([r["kl"] for r in rows])                # a perfect and a reversed ranking
    assert scores(kl, kl * 3, np.zeros(11), np.ones(11))["spearman"] == pytest.approx(1)
    assert scores(kl, 1 / kl, np.zeros(11), np.ones(11))["spearman"] == pytest.approx(-1)


def test_fit_reports_both_predictors_and_round_trips(tiny_traces, tmp_path):
    rows = read_traces(tiny_traces)
    a, rep = fit(rows, holdout=0.25)
    assert rep["rows"] == len(rows) and rep["heldout_sequences"] == 2
    # the heuristic's held-out scores, recomputed from the rows: they are those of exactly
    # one pair of held-out sequences, whose rows the report counts
    seqs = sorted({r["seq"] for r in rows})
    matches = []
    for pair in itertools.combinations(seqs, 2):
        held = [r for r in rows if r["seq"] in pair]
        want = _reference_scores(held, [r["heuristic"] for r in held])
        if rep["heuristic"] == pytest.approx(want, rel=1e-9):
            matches.append((pair, len(held)))
    assert len(matches) == 1 and rep["heldout_rows"] == matches[0][1]
    assert rep["learned"]["spearman"] > 0.5          # it learned something real
    # and prices moves closer than the heuristic, whose numbers are PPL fractions, not KL
    assert rep["learned"]["mae_log10"] < rep["heuristic"]["mae_log10"] / 2
    path = art.save(a, tmp_path / "p.skops")
    b = art.load(path, model_id="random:tiny")
    X = np.array([vector(r["features"]) for r in rows])
    assert np.array_equal(a.members[0].predict_kl(X), b.members[0].predict_kl(X))
    assert b.strategies == a.strategies and np.array_equal(b.members[0].lo, X.min(0))
    assert b.members[0].info["heldout"]["learned"]["spearman"] == rep["learned"]["spearman"]


def _rewrite_header(src, dst, **changes):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name == art.HEADER_NAME:
                data = json.dumps({**json.loads(data), **changes}).encode()
            zout.writestr(name, data)
    return dst


@pytest.fixture(scope="module")
def tiny_artifact(tiny_traces, tmp_path_factory):
    a, _ = fit(read_traces(tiny_traces))
    return art.save(a, tmp_path_factory.mktemp("art") / "tiny.skops")


@pytest.mark.parametrize("changes, msg", [
    (dict(schema_version=99), "feature schema"),
    (dict(features=list(SCHEMA[:-1])), "feature schema"),
    (dict(version=3), "format version 3"),
    (dict(members=[]), "describes 0 members"),
    (dict(format="other"), "not a kvctl predictor"),
    (dict(model_id="SmolLM2-135M-Instruct"), "trained for model"),
])
def test_load_refuses_mismatched_artifacts(tiny_artifact, tmp_path, changes, msg):
    bad = _rewrite_header(tiny_artifact, tmp_path / "bad.skops", **changes)
    with pytest.raises(art.ArtifactError, match=msg):
        art.load(bad, model_id="random:tiny")


def test_load_refuses_untrusted_content_and_pickles(tiny_artifact, tmp_path):
    import skops.io as sio

    evil = tmp_path / "evil.skops"       # code a loader would run: functools.partial(print)
    sio.dump(functools.partial(print, "owned"), evil)
    header = zipfile.ZipFile(tiny_artifact).read(art.HEADER_NAME)
    with zipfile.ZipFile(evil, "a") as z:
        z.writestr(art.HEADER_NAME, header)
    with pytest.raises(art.ArtifactError, match="does not trust"):
        art.load(evil)
    other = tmp_path / "linear.skops"    # trusted by skops, but not a predictor model
    from sklearn.linear_model import LinearRegression
    sio.dump(LinearRegression().fit([[0.0], [1.0]], [0.0, 1.0]), other)
    with zipfile.ZipFile(other, "a") as z:
        z.writestr(art.HEADER_NAME, header)
    with pytest.raises(art.ArtifactError, match="not a HistGradientBoostingRegressor"):
        art.load(other)
    pkl = tmp_path / "model.skops"
    pkl.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(art.ArtifactError, match="not a kvctl predictor file"):
        art.load(pkl)
    with pytest.raises(art.ArtifactError, match="does not exist"):
        art.load(tmp_path / "missing.skops")


# ---------------------------------------------------------------- fallback + wiring
def test_learned_predictor_falls_back_to_the_heuristic(tiny_artifact, tmp_path, monkeypatch):
    seq = view()
    cands = [s.propose(seq, 3 * FULL, CTX) for s in (ColdQuantization(4), HeavyHitterEviction(),
                                                     ColdOffload())]
    items = [(seq, c) for c in cands]
    heur = HeuristicPredictor().predict_many(items)
    before = FALLBACKS.value
    none = LearnedPredictor.from_file(tmp_path / "missing.skops")
    assert none.artifact is None and "does not exist" in none.reason
    assert none.predict_many(items) == heur and none.num_fallbacks == 3
    assert FALLBACKS.value - before == 3
    # a real artifact, but this hand-made sequence is far outside what it was trained on
    learned = LearnedPredictor.from_file(tiny_artifact, "random:tiny")
    x = np.array(vector(candidate_features(seq, cands[0])))
    assert learned.artifact.member_for(cands[0].strategy, x) is None
    assert learned.predict(seq, cands[0]) == heur[0] and learned.num_fallbacks == 1
    assert learned.info() == ("learned", "random:tiny, 1 member", 1, 1)   # kvctl status
    assert none.info()[0] == "heuristic" and "does not exist" in none.info()[1]
    # no artifact for the model: the heuristic itself (random:tiny ships none)
    monkeypatch.delenv("KVCTL_PREDICTOR", raising=False)
    assert not artifact_path("random:tiny").exists()
    assert isinstance(predictor_for("random:tiny"), HeuristicPredictor)
    monkeypatch.setenv("KVCTL_PREDICTOR", str(tmp_path / "missing.skops"))
    p = predictor_for("random:tiny")            # an operator's file that is not there
    assert isinstance(p, LearnedPredictor) and p.artifact is None


def test_members_price_what_their_ranges_hold_in_order(tiny_traces, tmp_path):
    """A file of two members (long sequences' traces, short ones'): a move the first
    holds is priced by the first, one only the second holds by the second, one neither
    holds by the heuristic; the file round-trips, and a version-1 file (one model) loads."""
    import skops.io as sio

    rows = read_traces(tiny_traces)
    seqs = sorted({r["seq"] for r in rows})
    a, reps = fit_members([[r for r in rows if r["seq"] in seqs[:4]],
                           [r for r in rows if r["seq"] in seqs[4:]]])
    assert len(a.members) == len(reps) == 2 and all("learned" in r for r in reps)
    b = art.load(art.save(a, tmp_path / "two.skops"), "random:tiny")
    X = np.array([vector(r["features"]) for r in rows])
    for ma, mb in zip(a.members, b.members):
        assert np.array_equal(ma.predict_kl(X), mb.predict_kl(X))
        assert mb.info["trained_on"]["rows"] == ma.info["trained_on"]["rows"]
    one, two = b.members
    assert not np.array_equal(one.predict_kl(X), two.predict_kl(X))   # two real models
    seq = view()
    cand = ColdQuantization(4).propose(seq, 3 * FULL, CTX)
    x = np.array(vector(candidate_features(seq, cand)))
    p = LearnedPredictor(b)
    assert p.predict(seq, cand).source == "heuristic" and p.num_fallbacks == 1
    # widen the ranges by hand: the second member holds the move, then both do
    two.lo, two.hi = np.minimum(two.lo, x), np.maximum(two.hi, x)
    want_two = float(two.predict_kl(x[None])[0])
    got = p.predict(seq, cand)
    assert (got.source, got.accuracy, p.num_fallbacks) == ("learned", want_two, 1)
    one.lo, one.hi = np.minimum(one.lo, x), np.maximum(one.hi, x)
    assert p.predict(seq, cand).accuracy == float(one.predict_kl(x[None])[0]) != want_two
    # a version-1 file: one model, its ranges at the top of the header
    v1 = tmp_path / "v1.skops"
    sio.dump(one.model, v1)
    header = {k: v for k, v in b.header().items() if k != "members"}
    with zipfile.ZipFile(v1, "a") as z:
        z.writestr(art.HEADER_NAME, json.dumps({**header, **one.header(), "version": 1}))
    c = art.load(v1, "random:tiny")
    assert len(c.members) == 1 and c.members[0].info["trained_on"] == one.info["trained_on"]
    assert np.array_equal(c.members[0].predict_kl(X), one.predict_kl(X))
    # a version-2 header over a single model (or the other way round) is refused
    bad = tmp_path / "bad.skops"
    sio.dump(one.model, bad)
    with zipfile.ZipFile(bad, "a") as z:
        z.writestr(art.HEADER_NAME, json.dumps(b.header()))
    with pytest.raises(art.ArtifactError, match="describes 2 members"):
        art.load(bad)


def test_predictor_for_does_not_wait_for_the_file_to_load(tiny_artifact, tmp_path, monkeypatch):
    """The daemon serves while the predictor file loads (scikit-learn + skops: ~1.8 s of
    its start); the first use of the artifact waits for it."""
    import threading

    release = threading.Event()
    real_load = art.load

    def slow_load(*a, **kw):
        assert release.wait(10)
        return real_load(*a, **kw)

    monkeypatch.setattr(art, "load", slow_load)
    monkeypatch.setenv("KVCTL_PREDICTOR", str(tiny_artifact))
    got = []
    caller = threading.Thread(target=lambda: got.append(predictor_for("random:tiny")), daemon=True)
    caller.start()
    caller.join(5)
    release.set()
    assert got, "predictor_for waited for the file to load"
    assert isinstance(got[0], LearnedPredictor) and got[0].artifact is not None
    assert got[0].reason == ""
    bad = tmp_path / "bad.skops"
    bad.write_bytes(b"not a zip")
    monkeypatch.setenv("KVCTL_PREDICTOR", str(bad))
    p = predictor_for("random:tiny")            # a file that does not load: the heuristic decides
    assert p.artifact is None and "not a kvctl predictor" in p.reason


def test_fallbacks_reach_the_prometheus_counter():
    from controller.metrics import Metrics
    from controller.telemetry import GpuSample, HostSample, Sample

    m = Metrics()
    sample = Sample(0.0, GpuSample(available=False), HostSample(1, 1, 1, 1))
    m.update(sample)
    base = m.predictor_fallbacks._value.get()
    FALLBACKS.inc(2)
    m.update(sample)
    assert m.predictor_fallbacks._value.get() - base == 2


def test_policy_loop_uses_the_learned_predictor_when_the_model_has_one(tiny_artifact,
                                                                        monkeypatch):
    from controller.policy import Controller, DecisionLog, PolicyState
    from tests.controller.helpers import tiny_engine
    from tests.controller.test_loop import fill

    e = tiny_engine()
    try:
        fill(e)
        used = e.handle.snapshot().tiers["gpu"].used_bytes
        monkeypatch.delenv("KVCTL_PREDICTOR", raising=False)
        plain = Controller(PolicyState(budget_bytes=used), DecisionLog(), e.handle)
        assert isinstance(plain.loop.predictor, HeuristicPredictor)
        monkeypatch.setenv("KVCTL_PREDICTOR", str(tiny_artifact))
        c = Controller(PolicyState(budget_bytes=used), DecisionLog(), e.handle)
        assert isinstance(c.loop.predictor, LearnedPredictor) and c.loop.predictor.artifact
        snap = e.handle.snapshot()
        moves = c.loop.candidates(snap, used // 4, "balanced", {}, now=1e9)
        assert moves and any(m.source == "learned" for m in moves)
        decisions = [d for d in c.tick(snap) if d.kind in ("quantize", "evict", "offload")]
        assert decisions and all("predictor" in d.reason for d in decisions)
    finally:
        e.stop()


# ---------------------------------------------------------------- kvctl train
def test_kvctl_train_records_fits_and_explains_errors(tmp_path):
    env = child_env()
    traces, model = tmp_path / "t.jsonl", tmp_path / "m.skops"

    def kvctl(*args):
        return subprocess.run(KVCTL + ["train", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)

    r = kvctl("record", "--out", str(traces), "--model", "random:tiny", "--sequences", "4",
              "--min-tokens", "128", "--max-tokens", "256", "--horizon", "6")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and len(traces.read_text().splitlines()) > 20
    r = kvctl("fit", "--traces", str(traces), "--out", str(model), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert {"learned", "heuristic"} <= set(rep) and art.load(model, "random:tiny")
    r = kvctl("fit", "--traces", str(traces), "--traces", str(traces), "--out", str(model))
    assert r.returncode == 0, r.stderr
    assert "member 2" in r.stdout and len(art.load(model, "random:tiny").members) == 2
    r = kvctl("fit", "--traces", str(tmp_path / "nope.jsonl"), "--out", str(model))
    assert r.returncode == 1 and "nope.jsonl does not exist" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(traces.read_text().splitlines()[0] + "\n{\"not\": \"a row\"}\n")
    r = kvctl("fit", "--traces", str(bad), "--out", str(model))
    assert r.returncode == 1 and "bad.jsonl:2: not a kvctl trace row" in r.stderr
    assert "Traceback" not in r.stderr
    r = kvctl("record", "--out", str(traces), "--sequences", "0")
    assert r.returncode == 1 and "--sequences must be >= 1" in r.stderr


# ---------------------------------------------------------------- the bus offload crosses
def test_offload_is_priced_by_the_node_it_runs_on():
    """Issue 15: a CPU engine has no bus (offload is a host copy: zero added latency,
    labelled so); a GPU's link is read from NVML (generation x width at the measured
    copy efficiency, less the traffic on it now)."""
    from controller.predictors.bus import Bus
    from controller.telemetry import GpuSample

    seq = view()
    cand = ColdOffload().propose(seq, 4 * FULL, CTX)
    cpu = Bus.of(SimpleNamespace(device="cpu"), None)
    assert cpu.bytes_per_s is None and "cpu" in cpu.source
    assert HeuristicPredictor().predict(seq, cand, cpu).latency_s == 0.0
    gen5 = GpuSample(available=True, pcie_generation=5, pcie_width=16)
    gen4 = GpuSample(available=True, pcie_generation=4, pcie_width=16,
                     pcie_rx_bytes_per_s=int(0.5 * 1.969e9 * 16))
    b5 = Bus.of(SimpleNamespace(device="cuda:0"), gen5)
    b4 = Bus.of(SimpleNamespace(device="cuda:0"), gen4)
    assert b5.bytes_per_s == pytest.approx(3.938e9 * 16 * 0.878)
    assert b4.busy_fraction == pytest.approx(0.5)
    streamed = sum(b.nbytes for b in seq.blocks if b.index in cand.blocks)
    t5 = HeuristicPredictor().predict(seq, cand, b5).latency_s
    t4 = HeuristicPredictor().predict(seq, cand, b4).latency_s
    assert t5 == pytest.approx(streamed / (3.938e9 * 16 * 0.878))
    assert t4 == pytest.approx(4 * t5, rel=0.01)     # half the lanes' rate, half of it busy
    unknown = Bus.of(SimpleNamespace(device="cuda"), GpuSample(available=False))
    assert unknown.bytes_per_s == 55.3e9 and "assumed" in unknown.source


def test_offload_proposes_only_what_the_host_tier_and_staging_hold():
    """No host tier: no offload proposal (the engine would refuse it: the reliability
    load benchmark logged 196 such refusals); a host tier with room for 3 blocks: at
    most 3; exact mode: no more than one step's staging buffer (per layer) either."""
    from dataclasses import replace

    seq = view()
    assert ColdOffload().propose(seq, 8 * FULL, replace(CTX, host_free_bytes=0)) is None
    assert ColdOffload(top_k_fraction=0.25).propose(
        seq, 8 * FULL, replace(CTX, host_free_bytes=0)) is None
    c = ColdOffload().propose(seq, 8 * FULL, replace(CTX, host_free_bytes=3 * FULL))
    assert len(c.blocks) == 3 and c.freed_bytes == 3 * FULL
    assert c.actions[-1].blocks == c.blocks
    # 2 layers: a block streams FULL / 2 bytes a layer; staging for 2 of them
    c = ColdOffload().propose(seq, 8 * FULL, replace(CTX, num_layers=2, staging_bytes=FULL))
    assert len(c.blocks) == 2
    assert len(ColdOffload().propose(seq, 8 * FULL, CTX).blocks) == 8     # unknown: no cap
