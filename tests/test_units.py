"""Filter selection: every index checked before compute."""

import numpy as np
import pytest

import fvis
from fvis.errors import InvalidTypeError, InvalidValueError, UnitIndexError
from fvis.units import parse_units


@pytest.mark.parametrize("spec, expected", [
    ("all", list(range(8))), (3, [3]), ([0, 5, 2], [0, 5, 2]), ("0:4", [0, 1, 2, 3]),
    (":3", [0, 1, 2]), ("4:", [4, 5, 6, 7]), ("0:8:3", [0, 3, 6]), ("5", [5]), (range(2, 4), [2, 3]),
])
def test_specs(spec, expected):
    units = parse_units(spec, 8)
    assert units.dtype == np.int32 and units.tolist() == expected


@pytest.mark.parametrize("spec, error, message", [
    (8, UnitIndexError, "valid indices are 0..7"),
    (-1, UnitIndexError, "out of range"),
    ([1, 2, 1], InvalidValueError, "more than once"),
    ("0:9", UnitIndexError, "reaches index 8"),
    ("3:3", InvalidValueError, "No filters"),
    ("a:b", InvalidValueError, "start:stop"),
    (1.5, InvalidTypeError, "filters must be"),
    ([0, True], InvalidTypeError, "integers"),
    ("-100:", UnitIndexError, "negative bound"),
    (":-2", UnitIndexError, "negative bound"),
])
def test_bad_specs(spec, error, message):
    with pytest.raises(error, match=message):
        parse_units(spec, 8)


@pytest.mark.parametrize("spec, message", [
    ([3_000_000_000], "Filter index 3000000000 is out of range.*0..2147483647"),
    ("0:3000000000", "indices must be <= 2147483647"),
])
def test_indices_beyond_int32_are_refused_for_objectives_without_units(spec, message):
    with pytest.raises(UnitIndexError, match=message):
        parse_units(spec, None)


def test_index_checked_against_layer_before_compile(tiny, step_traces):
    before = len(step_traces)
    with pytest.raises(UnitIndexError, match="the layer has 16 units"):
        fvis.prepare(tiny, "conv2", [15, 16])
    assert len(step_traces) == before
