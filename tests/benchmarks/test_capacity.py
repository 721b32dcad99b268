"""The capacity driver (benchmarks/headline/capacity.py) on the CPU smoke shape: with a
request waiting for room counted as pressure, pinning int4 fits more sequences at once
into the same budget than full precision does, with no preemption."""
import json


def test_int4_runs_more_sequences_at_once_than_full_precision(tmp_path):
    from benchmarks.headline.capacity import main
    main(["--smoke", "--counts", "3,6", "--configs", "none,quantize_int4",
          "--out", str(tmp_path)])
    res = json.loads((tmp_path / "capacity.json").read_text())
    assert res["done"]                 # written after every count, marked whole at the end
    best = res["best"]
    assert best.get("none") == res["full_by_bytes"] == 3
    assert best.get("quantize_int4", 0) > best["none"]
    for r in res["rows"]:
        if r["met"]:
            assert r["preemptions"] == 0 and r["max_decoding"] >= r["count"]
    assert "| quantize_int4 |" in (tmp_path / "capacity.md").read_text()
