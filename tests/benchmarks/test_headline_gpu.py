"""The headline suite's speed side end to end on the CPU (random:tiny, --smoke): it runs,
writes its table, and loses no accepted request."""
import json

from benchmarks.headline import gpu


def test_gpu_workload_smoke(tmp_path):
    cfgs = ["none", "adaptive:balanced", "quantize_int4"]
    gpu.main(["--smoke", "--fidelity", "--configs", ",".join(cfgs), "--out", str(tmp_path)])
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert [r["config"] for r in res["rows"]] == cfgs
    assert all(r["budget_bytes"] * 4 <= res["meta"]["demand_gb"] * 1e9 * 1.001
               for r in res["rows"])
    for r in res["rows"]:
        assert r["lost"] == 0 and r["refused"] == 0, r
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0
        # where the engine's time went, and the longest waits between two tokens
        t = r["step_times"]
        assert t["prefill_steps"] > 0 and t["decode_steps"] > 0 and t["launch"] > 0
        # (gaps are reported to 0.1 ms, the p99 unrounded)
        assert r["worst_gaps"] and r["worst_gaps"][0]["ms"] >= r["tpot_p99_ms"] - 0.05
    assert res["rows"][1]["decisions"], "the policy never acted under 4x demand"
    # the adaptive run priced moves and says how many the learned model left over;
    # no controller, nothing priced
    ad = res["rows"][1]
    assert ad["predictor_calls"] > 0 and 0 <= ad["predictor_fallbacks"] <= ad["predictor_calls"]
    assert res["rows"][0]["predictor_calls"] == 0
    # every step of the run, with its parts
    assert min(ad["steps"], 1024) <= len(ad["step_log"]) <= 1024   # idle steps logged too
    assert all(s[1] in ("prefill", "decode", "idle") and s[2] >= 0 for s in ad["step_log"])
    md = (tmp_path / "gpu.md").read_text()
    assert all(f"| {c} |" in md for c in cfgs)
    assert "Where the engine thread's time went" in md
    # each config's outputs against the same requests run unpressured first
    for r in res["rows"]:
        f = r["fidelity"]
        assert f["requests"] == len(r["outputs"]) and 0 <= f["identical"] <= f["prefix_share"] <= 1
    assert md.count("greedy outputs against the unpressured run") == len(cfgs)
    assert "| paused |" in md and all(r["paused"] >= 0 for r in res["rows"])
    # random weights have no learned artifact: the table names the heuristic instead of
    # counting its every move as a fallback; with the learned one it counts fallbacks
    assert ad["predictor"] == "heuristic" and "adaptive:balanced: heuristic predictor (" in md
    learned = gpu.markdown(res["meta"], [dict(r, predictor="learned") for r in res["rows"]])
    assert "adaptive:balanced: learned-predictor fallbacks" in learned


def test_fidelity_counts_tokens_before_the_first_difference():
    ref = {"a": [1, 2, 3, 4], "b": [5, 6], "c": [7]}
    f = gpu.fidelity({"a": [1, 2, 9, 4], "b": [5, 6], "c": [8], "d": [1]}, ref)
    assert f == dict(requests=3, prefix_share=(0.5 + 1.0 + 0.0) / 3, identical=1 / 3)
    assert gpu.fidelity({}, ref)["requests"] == 0       # nothing finished: no figure


def test_policy_tick_plans_moves_for_every_sequence(capsys):
    """benchmarks/policy_tick.py at a small scale: a relief plan on its synthetic
    snapshot moves every sequence (each holds its share of the bytes to free)."""
    import sys

    from benchmarks import policy_tick
    argv, sys.argv = sys.argv, ["policy_tick", "--sequences", "4", "--blocks", "12",
                                "--reps", "1"]
    try:
        policy_tick.main()
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert "4 sequences x 12 blocks, balanced" in out and out.rstrip().endswith("; 4 moves")


def test_profile_moves_names_where_the_moves_lap_went(tmp_path):
    """--profile-moves writes the engine thread's moves and admissions profile: the
    moves the policy made under 4x demand are in it, and the run's row points at it."""
    gpu.main(["--smoke", "--configs", "adaptive:balanced", "--profile-moves",
              "--out", str(tmp_path)])
    res = json.loads((tmp_path / "gpu.json").read_text())
    row = res["rows"][0]
    text = (tmp_path / "moves-profile-adaptive_balanced.txt").read_text()
    assert row["moves_profile"].endswith("moves-profile-adaptive_balanced.txt")
    assert row["decisions"], "no move to profile"
    assert "engine/moves.py" in text and "_admit" in text
