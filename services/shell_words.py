"""Whether a command line can be split into words as ``shlex.split`` splits it (POSIX rules, no
comments), checked in linear time without splitting.

``shlex.split`` grows each word one character at a time, which is quadratic in a word's length: a
1 MiB ``task_args`` took 14 s to validate on the WMS's event loop, an 8 MiB one many minutes. A
line fails to split only on an unclosed quote or a trailing backslash, which one possessive regular
expression finds in a single pass; the error names are ``shlex.split``'s (a property test compares
the two).
"""

from __future__ import annotations

import re

NO_CLOSING_QUOTATION = "No closing quotation"
NO_ESCAPED_CHARACTER = "No escaped character"
# Complete pieces of words and the space between them: plain characters, a backslash and the
# character it escapes, a single-quoted string, a double-quoted string (inside which a backslash
# escapes the next character). Possessive: the pieces start with different characters, so there is
# never anything to backtrack to, and a failed match costs one pass.
_COMPLETE = re.compile(
    r"""(?:[^'"\\]++|\\.|'[^']*+'|"(?:[^"\\]++|\\.)*+")*+""",
    re.DOTALL,
)
# What is left when a line does not split: a double-quoted string cut short after a backslash.
_QUOTED_ESCAPE_AT_END = re.compile(r'"(?:[^"\\]++|\\.)*+\\', re.DOTALL)


def split_problem(line: str) -> str | None:
    """The error ``shlex.split(line)`` raises, or None if it splits the line."""
    complete = _COMPLETE.match(line)  # always matches, if only the empty string
    rest = line[complete.end() if complete is not None else 0 :]
    if not rest:
        return None
    if rest == "\\" or _QUOTED_ESCAPE_AT_END.fullmatch(rest):
        return NO_ESCAPED_CHARACTER
    return NO_CLOSING_QUOTATION
