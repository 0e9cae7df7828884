"""Checks of the numbers a user, a config file or a checkpoint gives the library.

Every count that sizes an allocation or a loop goes through :func:`integer` (or
:func:`number` for real values) before it is used, so a bad value ends in one
:class:`~napari_stofm.errors.StofmError` that names the setting, the value and the range,
instead of a ``TypeError`` deep in torch, a silent truncation (``int(3.7)``) or an attempt to
allocate terabytes. Plain Python and numpy only: every layer of the package may import it.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Type

from napari_stofm.errors import StofmError, StofmInputError


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def integer(value, name: str, *, minimum: Optional[int] = None, maximum: Optional[int] = None,
            error: Type[StofmError] = StofmInputError, where: str = "", fix: str = "") -> int:
    """``value`` as a Python int, or ``error`` saying why not.

    Accepted: ints, numpy integers and integral floats (``4.0``). Refused: bools, strings,
    non-integral or non-finite floats, and values outside ``[minimum, maximum]``.
    ``where`` prefixes the message (e.g. the file the value came from); ``fix`` ends it.
    """
    prefix = f"{where}: " if where else ""
    suffix = f"; {fix}" if fix else ""
    bounds = _bounds(minimum, maximum)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{prefix}{name} must be an integer{bounds}, got {_describe(value)} "
                    f"({type(value).__name__}){suffix}")
    if isinstance(value, numbers.Integral):
        out = int(value)
    else:
        f = float(value)
        if not math.isfinite(f) or f != math.floor(f):
            raise error(f"{prefix}{name} must be a whole number{bounds}, got {_describe(value)} "
                        f"(it would be cut to {int(f) if math.isfinite(f) else 'nothing'}){suffix}")
        out = int(f)
    if (minimum is not None and out < minimum) or (maximum is not None and out > maximum):
        raise error(f"{prefix}{name} must be an integer{bounds}, got {out}{suffix}")
    return out


def number(value, name: str, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
           exclusive_minimum: bool = False, exclusive_maximum: bool = False,
           error: Type[StofmError] = StofmInputError, where: str = "", fix: str = "") -> float:
    """``value`` as a finite Python float in the given range, or ``error`` saying why not."""
    prefix = f"{where}: " if where else ""
    suffix = f"; {fix}" if fix else ""
    lo = "" if minimum is None else f"{'>' if exclusive_minimum else '>='} {minimum}"
    hi = "" if maximum is None else f"{'<' if exclusive_maximum else '<='} {maximum}"
    bounds = f" ({', '.join(b for b in (lo, hi) if b)})" if (lo or hi) else ""
    if minimum == 0 and exclusive_minimum and maximum is None:
        bounds = " > 0 (a positive number)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{prefix}{name} must be a number{bounds}, got {_describe(value)} "
                    f"({type(value).__name__}){suffix}")
    f = float(value)
    if not math.isfinite(f):
        raise error(f"{prefix}{name} must be a finite number{bounds}, got {_describe(value)}{suffix}")
    too_low = minimum is not None and (f <= minimum if exclusive_minimum else f < minimum)
    too_high = maximum is not None and (f >= maximum if exclusive_maximum else f > maximum)
    if too_low or too_high:
        raise error(f"{prefix}{name} must be a number{bounds}, got {_describe(value)}{suffix}")
    return f


def _bounds(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return {0: " >= 0", 1: " >= 1 (a positive integer)"}.get(minimum, f" >= {minimum}")
    if maximum is not None:
        return f" <= {maximum}"
    return ""
