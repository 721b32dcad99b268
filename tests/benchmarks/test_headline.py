"""The headline suite's --quick path (random:tiny, no peers) end to end: every config it
plans either ran or says why not, and the outputs exist."""
import json

from benchmarks.headline import __main__ as headline
from benchmarks.headline import peers


def test_quick_suite_writes_every_config(tmp_path):
    headline.main(["--quick", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "headline.json").read_text())
    md = (tmp_path / "headline.md").read_text()

    class A:                      # the configs --quick plans (every strategy and profile)
        fixed, profiles, host, budgets = "all", "all", "both", [0.5, 0.25, 0.125]
    by_engine, _ = headline.plan(A)
    planned = {c.name for cs in by_engine.values() for c in cs} | {"full"}
    ran = {r["config"] for r in res["records"]}
    assert planned <= ran, planned - ran
    tasks = {"passkey", "two_needles", "text"}
    for name in planned:
        assert {r["task"] for r in res["records"] if r["config"] == name} == tasks, name
        assert f"| {name} |" in md or f"| {name} ⚠" in md, name
    # peers: not run here, and the table says so for each
    for c in peers.configs(list(peers.PEERS), A.budgets):
        assert "--peers none" in res["not_run"][c["name"]]
        assert c["name"] in md
    # the fixed strategies moved the fork's blocks (shared with the base: copy on write)
    for r in res["records"]:
        if r["kind"] == "fixed" and not r["strategy"].startswith("offload"):
            assert r["gpu"] < 0.9, (r["config"], r["gpu"])
        if r["kind"] == "fixed" and r["strategy"] == "offload_exact":
            assert r["read"] > 0.99 > r["gpu"], r["config"]
    assert {c["status"] for c in res["must_show"]} <= {"PASS", "FAIL", "N/A"}
    assert res["must_show"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "accuracy_vs_bytes.png").stat().st_size > 0
    assert (tmp_path / "timeline.png").stat().st_size > 0
