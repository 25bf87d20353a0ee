"""argparse types for the numbers the command lines take: each refuses what would be meaningless (a negative
count, a NaN strength) with a message naming the value, through argparse's usual exit status 2."""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type) -> float | int:
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def finite_float(text: str) -> float:
    """A float that is not NaN or infinite (a strength: NaN would make every weight it touches NaN)."""
    value = _number(text, float)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; use e.g. 1, 0.5 or 0")
    return value


def non_negative_int(text: str) -> int:
    """A count that may be 0."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative; give 0 or more")
    return value


def positive_int(text: str) -> int:
    """A count of at least 1."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is less than 1; give 1 or more")
    return value


def seed(text: str) -> int:
    """A random seed: a whole number from 0 to 2**64 - 1 (what torch's generators take)."""
    value = _number(text, int)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range; give a seed from 0 to {2**64 - 1}")
    return value
