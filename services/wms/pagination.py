"""Page tokens for List RPCs: opaque to clients, bound to the filters they were issued for.

A token records the sequence number of the last object returned (keyset pagination: pages stay
stable while new objects are created) and a fingerprint of the request's filters.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass

from services.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class Page:
    """Where a page starts and how long it is."""

    after_seq: int
    size: int
    fingerprint: str

    def next_token(self, last_seq: int | None, returned: int) -> str:
        """The next page's token, or "" if this page was the last."""
        if last_seq is None or returned < self.size:
            return ""
        raw = json.dumps({"after": last_seq, "f": self.fingerprint}).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def page_of(page_size: int, page_token: str, *filters: object) -> Page:
    """Decode a request's page size and token; INVALID_ARGUMENT naming the field if either is
    bad or the token was issued for other filters."""
    fingerprint = hashlib.sha256(repr(filters).encode()).hexdigest()[:16]
    violations: list[tuple[str, str]] = []
    if page_size < 0 or page_size > MAX_PAGE_SIZE:
        violations.append(("page_size", f"must be between 0 and {MAX_PAGE_SIZE} (0: default)"))
    after = 0
    if page_token:
        try:
            raw = base64.urlsafe_b64decode(page_token + "=" * (-len(page_token) % 4))
            decoded = json.loads(raw)
            after = int(decoded["after"])
            if decoded["f"] != fingerprint:
                violations.append(
                    ("page_token", "was issued for different filters; repeat the same filters")
                )
        except (ValueError, KeyError, TypeError):
            violations.append(("page_token", "is not a token returned by this list"))
    if violations:
        raise InvalidArgument(violations)
    return Page(after, page_size or DEFAULT_PAGE_SIZE, fingerprint)
