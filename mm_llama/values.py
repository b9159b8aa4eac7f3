"""What counts as an integer and as a number wherever mm-llama checks a value a user passed (API arguments, config
fields, data settings). `True` is an `int` to Python but never a count here, and nan/inf are never a setting."""

from __future__ import annotations

import math
import numbers


def is_int(value: object) -> bool:
    """A real integer (Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """An int or float (Python's or numpy's) that is neither nan nor infinite, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
