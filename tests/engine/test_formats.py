"""The format record (engine/actions.py KVFormat): names, table codes, precision order."""
import pytest

from engine.actions import FP8, FP8_CODE, FULL, KVFormat, Quantize

NAMES = ["full", "int8", "int4", "int2", "fp8", "k4v2", "k8v4", "kfp8v4", "k4vfp8",
         "kfullvfp8", "kfp8vfull", "k2v8"]


@pytest.mark.parametrize("name", NAMES)
def test_names_and_codes_round_trip(name):
    f = KVFormat.parse(name)
    assert f.name == name and KVFormat.parse(f.name) == f
    assert KVFormat.from_codes(f.k_code, f.v_code) == f == KVFormat.from_code(f.code)
    assert Quantize.to("s", (1, 2), f) == Quantize("s", (1, 2), f.k_bits, f.v_bits, f.fp8)


def test_fp8_is_its_own_format_beside_int8():
    assert KVFormat.parse("fp8") == FP8 == KVFormat(8, 8, fp8=True) != KVFormat(8, 8)
    assert (FP8.k_code, FP8.v_code, FP8.k_bits) == (FP8_CODE, FP8_CODE, 8)
    assert KVFormat(8, 4, fp8=True).name == "kfp8v4" and not KVFormat(8, 4, fp8=True).v_fp8
    assert len({KVFormat.parse(n).code for n in NAMES}) == len(NAMES)


@pytest.mark.parametrize("bad", ["kfp8v8", "k8vfp8", "fp9", "int3", "kxv4"])
def test_bad_names_are_refused(bad):
    with pytest.raises(ValueError):
        KVFormat.parse(bad)


def test_fp8_needs_an_8_bit_side():
    with pytest.raises(ValueError, match="fp8"):
        KVFormat(4, 4, fp8=True)


def test_precision_order():
    order = [FULL, KVFormat(8, 8), FP8, KVFormat(4, 4), KVFormat(2, 2)]
    ranks = [f.precision_rank() for f in order]
    assert ranks == sorted(ranks, reverse=True) and len(set(ranks)) == len(ranks)


def test_formats_compare_and_hash_as_their_codes():
    """Sets and dicts of formats (the graph key, snapshots, groupings) see equal formats
    made apart as one, and every distinct format as its own (fp8 beside int8 included)."""
    every = [KVFormat(k, v, fp8=f) for k in (0, 8, 4, 2) for v in (0, 8, 4, 2)
             for f in (False, True) if not f or 8 in (k, v)]
    again = [KVFormat.from_code(f.code) for f in every]
    assert all(a == b and hash(a) == hash(b) and a is not b for a, b in zip(every, again))
    assert len(set(every) | set(again)) == len(every) == 16 + 7
    assert {f: f.name for f in every}[KVFormat.parse("k4v2")] == "k4v2"
    assert KVFormat(8, 8) != FP8 and FULL != "full" and FULL == KVFormat()
