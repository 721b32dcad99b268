"""benchmarks.quantize_cost runs both ways (the Triton conversion in the interpreter on
a CPU machine) on a small shape and finds the same bytes."""
from benchmarks import quantize_cost
from tests.kernels.kernel_cases import kernel_module


def test_quantize_cost_small_shape_same_bytes(capsys):
    kernel_module("cpu")
    quantize_cost.main(["--device", "cpu", "--layers", "1", "--kv-heads", "1",
                        "--head-dim", "32", "--block", "8", "--blocks", "3", "--reps", "1",
                        "--formats", "int4,fp8"])
    out = capsys.readouterr().out
    assert out.count("same bytes: yes") == 2 and out.count("triton") >= 2, out
