"""benchmarks.fit_cost runs both ways on a small shape and finds the same codes."""
from benchmarks import fit_cost


def test_fit_cost_small_shape_same_codes(capsys):
    fit_cost.main(["--layers", "2", "--tokens", "128", "--reps", "1"])
    out = capsys.readouterr().out
    assert out.count("same codes: True") == 2, out
