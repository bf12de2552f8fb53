"""Resource sizes as users write them: integer bytes, or strings such as "512M", "8 GiB", "1GB".

Units are binary (K = 1024), as HTCondor and the original EWMS read them: "512M" is 512 MiB."""

from __future__ import annotations

import re

_UNITS = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(I?B?)\s*$", re.IGNORECASE)

SIZE_RULE = "must be a whole number of bytes or a size such as '512M', '8GiB' or '1 GB'"


def parse_size(value: str | int | float) -> int:
    """Bytes of a size; ``ValueError`` (with SIZE_RULE) if it is not one or is not positive."""
    if isinstance(value, bool):
        raise ValueError(SIZE_RULE)
    if isinstance(value, int | float):
        if value != int(value) or value < 1:
            raise ValueError(f"{SIZE_RULE} (got {value!r})")
        return int(value)
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"{SIZE_RULE} (got {value!r})")
    number, prefix, suffix = match.groups()
    if not prefix and suffix.upper() == "IB":
        raise ValueError(f"{SIZE_RULE} (got {value!r})")
    size = float(number) * 1024 ** _UNITS[prefix.upper()]
    if size < 1 or size != int(size):
        raise ValueError(f"{SIZE_RULE}, at least one byte (got {value!r})")
    return int(size)
