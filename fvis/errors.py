"""Errors for bad input: each names what was received and what would work.

Every class is also a standard Python exception (`ValueError`, `IndexError`, ...),
so callers can catch them the usual way; the command line catches `FvisError`
and prints the message alone, without a traceback.
"""

import numbers


class FvisError(Exception):
    """Base of the errors that describe a user's input rather than a bug."""

    def __str__(self):  # KeyError would otherwise print the message's repr
        return str(self.args[0]) if self.args else ""


class InvalidValueError(FvisError, ValueError):
    """A config or argument value is out of range or of the wrong form."""


class InvalidTypeError(FvisError, TypeError):
    """A model, layer or argument is of a kind fvis cannot use."""


class UnitIndexError(FvisError, IndexError):
    """A filter (unit) index is outside the layer's channels."""


class UnknownNameError(FvisError, KeyError):
    """A model, layer or option name does not exist."""


class MissingFileError(FvisError, FileNotFoundError):
    """A weights or model file cannot be found or read."""


class WeightsUnavailableError(FvisError, RuntimeError):
    """Pretrained weights cannot be downloaded (no network)."""


class NonFiniteError(FvisError, FloatingPointError):
    """An image or loss became NaN or Inf during optimisation."""


def did_you_mean(name, candidates, *, kind, n=3):
    """Builds "Unknown {kind} 'x'. Did you mean 'y'?" with the nearest candidates.

    Args:
        name: the name received.
        candidates: iterable of valid names.
        kind: what the name is of, e.g. "layer".
        n: how many suggestions to show at most.

    Returns:
        The message, ending with the received value, the Keras way.
    """
    import difflib

    candidates = list(candidates)
    close = difflib.get_close_matches(str(name), candidates, n=n, cutoff=0.5)
    if close:
        hint = "Did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    else:
        shown = ", ".join(f"'{c}'" for c in candidates[:12])
        more = f" and {len(candidates) - 12} more" if len(candidates) > 12 else ""
        hint = f"Valid names: {shown}{more}."
    return f"Unknown {kind} '{name}'. {hint} Received: {kind}='{name}'"


def is_integer(value):
    """True for Python and NumPy integers; False for bools (Python ints too) and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(name, value, minimum=1):
    """Returns int(value) or raises InvalidValueError naming the key: an integer >= `minimum`."""
    if not is_integer(value) or value < minimum:
        raise InvalidValueError(f"{name} must be an integer >= {minimum}. Received: {name}={value!r}")
    return int(value)
