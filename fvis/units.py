"""Which units (filters, channels, classes) to visualise: parsing and checking.

Indices are checked here, in Python, before anything is compiled: under jit an
out-of-range index would be clamped silently and give a wrong picture.
"""

import collections

import numpy as np

from fvis.errors import InvalidTypeError, InvalidValueError, UnitIndexError, is_integer


_MAX_INDEX = np.iinfo(np.int32).max  # indices travel as int32


def _parse_slice(text):
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(text)
    start, stop, *step = (int(p) if p.strip() else None for p in parts)
    return start, stop, (step[0] if step else None)


def parse_units(spec, num_units):
    """Turns a unit spec into a checked array of indices.

    Args:
        spec: "all"; an int; a list/tuple/range of ints; or a slice string
            "start:stop[:step]" (Python slice semantics, e.g. "0:64", ":16", "0:512:8").
        num_units: how many units the objective's layer has (its channel or class
            count), or None for objectives without units (then spec must be explicit
            and the indices only select random starts).

    Returns:
        np.ndarray of int32, in the order given.

    Raises:
        UnitIndexError: an index < 0 or >= num_units.
        InvalidValueError: an empty selection, a repeated index, or an unreadable spec.
        InvalidTypeError: a spec of an unsupported type.
    """
    valid = f"valid indices are 0..{num_units - 1}" if num_units else "indices must be >= 0"
    if isinstance(spec, str):
        text = spec.strip()
        if text == "all":
            if num_units is None:
                raise InvalidValueError("filters=all needs an objective with units (channel, neuron, "
                                        "class, direction); give a count such as filters=0:8 instead.")
            indices = list(range(num_units))
        else:
            try:
                if ":" in text:
                    start, stop, step = _parse_slice(text)
                    if stop is None and num_units is None:
                        raise ValueError(text)
                    if any(v is not None and v < 0 for v in (start, stop)):
                        raise UnitIndexError(f"filters='{spec}' has a negative bound; slices count from 0 "
                                             f"({valid}). Received: filters='{spec}'")
                    if num_units is None and stop > _MAX_INDEX:
                        raise UnitIndexError(f"filters='{spec}' reaches index {stop - 1}; indices must be "
                                             f"<= {_MAX_INDEX}. Received: filters='{spec}'")
                    indices = list(range(num_units or stop)[slice(start, stop, step)])
                    if start is not None and num_units is not None and start >= num_units:
                        raise UnitIndexError(f"filters='{spec}' starts at {start}, but the layer has "
                                             f"{num_units} units ({valid}).")
                    if stop is not None and num_units is not None and stop > num_units:
                        raise UnitIndexError(f"filters='{spec}' reaches index {stop - 1}, but the layer "
                                             f"has {num_units} units ({valid}). Received: filters='{spec}'")
                else:
                    indices = [int(text)]
            except ValueError as e:
                if isinstance(e, UnitIndexError):
                    raise
                raise InvalidValueError(f"Cannot read filters='{spec}'. Use 'all', an index, a list "
                                        "such as [0,1,2], or a slice 'start:stop[:step]' such as '0:64'.") from None
    elif is_integer(spec):
        indices = [int(spec)]
    elif isinstance(spec, (list, tuple, range, np.ndarray)) or type(spec).__name__ == "ListConfig":
        indices = list(spec)
        bad = [i for i in indices if not is_integer(i)]
        if bad:
            raise InvalidTypeError(f"filters must be integers. Received: filters={list(spec)!r}")
    else:
        raise InvalidTypeError(f"filters must be 'all', an int, a list of ints or 'start:stop'. "
                               f"Received: filters={spec!r} ({type(spec).__name__})")
    return check_units(indices, num_units, spec)


def check_units(indices, num_units, spec=None):
    """Checks explicit indices (see `parse_units`) and returns them as int32."""
    indices = [int(i) for i in indices]
    shown = spec if spec is not None else indices
    if not indices:
        raise InvalidValueError(f"No filters selected. Received: filters={shown!r}")
    out = [i for i in indices if i < 0 or i > _MAX_INDEX or (num_units is not None and i >= num_units)]
    if out:
        valid = f"0..{num_units - 1}" if num_units else f"0..{_MAX_INDEX}"
        raise UnitIndexError(f"Filter index {out[0]} is out of range: the layer has {num_units} units, "
                             f"valid indices are {valid}. Received: filters={shown!r}")
    counts = collections.Counter(indices)
    repeated = [i for i in indices if counts[i] > 1]
    if repeated:
        raise InvalidValueError(f"Filter index {repeated[0]} is requested more than once; each unit is "
                                f"visualised once (use images_per_unit for several images). "
                                f"Received: filters={shown!r}")
    return np.asarray(indices, np.int32)
