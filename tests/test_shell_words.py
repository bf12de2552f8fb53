"""services/shell_words.py says what shlex.split would say about a command line, in linear time."""

from __future__ import annotations

import shlex

from hypothesis import given, settings
from hypothesis import strategies as st

from services.shell_words import split_problem

# The characters shlex treats specially, whitespace it does and does not split on, and letters.
LINES = st.text(alphabet=st.sampled_from(" \t\r\n\x0b\xa0'\"\\ab#é"), max_size=24)


def shlex_problem(line: str) -> str | None:
    try:
        shlex.split(line)
    except ValueError as exc:
        return str(exc)
    return None


@settings(max_examples=1000, derandomize=True, database=None)
@given(LINES)
def test_split_problem_agrees_with_shlex(line: str) -> None:
    assert split_problem(line) == shlex_problem(line)


def test_the_two_problems_and_their_edge_cases() -> None:
    cases = {
        "cp a b": None,
        'a \'b c\' "d \\" e" f\\ g': None,
        "''": None,
        "'unclosed": "No closing quotation",
        '"unclosed \\"': "No closing quotation",
        "trailing \\": "No escaped character",
        '"quoted then \\': "No escaped character",
        "'single keeps \\": "No closing quotation",
    }

    assert {line: split_problem(line) for line in cases} == cases


def test_a_megabyte_word_is_checked_without_quadratic_time() -> None:
    # shlex.split takes about 14 s on this; the check is one regular-expression pass.
    line = "a" * (1 << 20) + " '" + "b" * (1 << 20)

    assert split_problem(line) == "No closing quotation"
