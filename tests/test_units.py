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
])
def test_bad_specs(spec, error, message):
    with pytest.raises(error, match=message):
        parse_units(spec, 8)


def test_index_checked_against_layer_before_compile(tiny):
    from fvis import render
    before = render.TRACE_COUNT["render"]
    with pytest.raises(UnitIndexError, match="the layer has 16 units"):
        fvis.prepare(tiny, "conv2", [15, 16])
    assert render.TRACE_COUNT["render"] == before
