"""Resource sizes as users write them: integer bytes, or strings such as "512M", "8 GiB", "1GB".

Units are binary (K = 1024), as HTCondor and the original EWMS read them: "512M" is 512 MiB.
Arithmetic is exact (fractions, not floats): a number of any length, infinity or NaN is a
ValueError naming the rule, never an OverflowError."""

from __future__ import annotations

import math
import re
from fractions import Fraction

_UNITS = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(I?B?)\s*$", re.IGNORECASE)

SIZE_RULE = "must be a whole number of bytes or a size such as '512M', '8GiB' or '1 GB'"


def parse_size(value: str | int | float) -> int:
    """Bytes of a size; ``ValueError`` (with SIZE_RULE) if it is not one or is not positive."""
    if isinstance(value, bool):
        raise ValueError(SIZE_RULE)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{SIZE_RULE} (got {value!r})")
    if isinstance(value, int | float):
        if not float(value).is_integer() or value < 1:
            raise ValueError(f"{SIZE_RULE} (got {value!r})")
        return int(value)
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"{SIZE_RULE} (got {_shown(value)})")
    number, prefix, suffix = match.groups()
    if not prefix and suffix.upper() == "IB":
        raise ValueError(f"{SIZE_RULE} (got {_shown(value)})")
    size = Fraction(number) * 1024 ** _UNITS[prefix.upper()]
    if size < 1 or size.denominator != 1:
        raise ValueError(f"{SIZE_RULE}, at least one byte (got {_shown(value)})")
    return int(size)


def _shown(value: str) -> str:
    """The value as quoted in an error: at most 40 characters of it."""
    return (
        repr(value) if len(value) <= 40 else f"{value[:40]!r}… ({len(value) - 40} more characters)"
    )
