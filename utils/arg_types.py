"""argparse `type=` callables that refuse out-of-range values when the command line is parsed.

A bad value then stops the program with argparse's one-line usage error naming the flag, before
any data is read or any file is written.
"""
import argparse
import math
from typing import Callable, Sequence


def _number(text: str, kind: type) -> float:
    """`text` as int or float; an argparse error for anything else (nan and inf are refused)."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer >= minimum."""
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = f"int >= {minimum}"
    return parse


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text}")
    return value


def crop_scale(text: str) -> float:
    """A RandomResizedCrop area fraction in (0, 1]."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be an area fraction in (0, 1], got {text}")
    return value


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def boolean(text: str) -> bool:
    """A yes/no value: true/false, on/off, yes/no, y/n, 1/0 (any case), as the authors' `--class_balancing False`."""
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off (or true/false, yes/no, 1/0), got {text!r}")


def one_of(values: Sequence[str]) -> Callable[[str], str]:
    """A string among `values` (an argparse type: the message lists them, as argparse's `choices` does)."""
    def parse(text: str) -> str:
        if text not in values:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(values)}, got {text!r}")
        return text
    parse.__name__ = f"one of {', '.join(values)}"
    return parse
