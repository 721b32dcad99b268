"""The headline suite's speed side end to end on the CPU (random:tiny, --smoke): it runs,
writes its table, and loses no accepted request."""
import json

from benchmarks.headline import gpu


def test_gpu_workload_smoke(tmp_path):
    cfgs = ["none", "adaptive:balanced", "quantize_int4"]
    gpu.main(["--smoke", "--configs", ",".join(cfgs), "--out", str(tmp_path)])
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert [r["config"] for r in res["rows"]] == cfgs
    assert all(r["budget_bytes"] * 4 <= res["meta"]["demand_gb"] * 1e9 * 1.001
               for r in res["rows"])
    for r in res["rows"]:
        assert r["lost"] == 0 and r["refused"] == 0, r
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0
    assert res["rows"][1]["decisions"], "the policy never acted under 4x demand"
    md = (tmp_path / "gpu.md").read_text()
    assert all(f"| {c} |" in md for c in cfgs)
