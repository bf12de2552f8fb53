"""services/errors.py keeps every status small enough for a gRPC client's default metadata limit:
quoted values cut, violations capped with a count of the rest, the whole within a byte budget."""

from __future__ import annotations

from google.rpc import error_details_pb2

from services.errors import (
    MAX_VIOLATIONS,
    STATUS_METADATA_BUDGET,
    InvalidArgument,
    NotFound,
    clip,
    metadata_bytes,
    quoted,
)


def listed(error: InvalidArgument) -> list[tuple[str, str]]:
    bad_request = error_details_pb2.BadRequest()
    assert error.to_status().details[0].Unpack(bad_request)
    return [(v.field, v.description) for v in bad_request.field_violations]


def test_hundreds_of_violations_list_twenty_and_count_the_rest() -> None:
    error = InvalidArgument([(f"tasks[{i}].n_workers", "must be at least 1") for i in range(300)])

    shown = listed(error)

    assert len(shown) == MAX_VIOLATIONS + 1
    assert shown[:2] == [
        ("tasks[0].n_workers", "must be at least 1"),
        ("tasks[1].n_workers", "must be at least 1"),
    ]
    assert shown[-1] == ("tasks", "and 280 more violations, not listed (of 300), in tasks")
    assert error.message == "invalid request: 300 problems (the first 20 listed)"
    assert error.violations[299] == ("tasks[299].n_workers", "must be at least 1")


def test_long_values_are_cut_saying_how_much_was_left_out() -> None:
    assert clip("x" * 20_000, 128) == "x" * 96 + "… (19904 more characters)"
    assert quoted("y" * 100) == repr("y" * 80) + "… (20 more characters)"
    assert quoted("short") == "'short'"


def test_any_input_fits_the_metadata_budget() -> None:
    # Four-byte characters and control characters: the worst for base64 and percent-encoding.
    nasty = "\U0001d518\x01" * 20_000
    errors = [
        InvalidArgument([(nasty, nasty)] * 50),
        InvalidArgument([(f"f{i}", nasty) for i in range(500)], nasty),
        NotFound(nasty),
    ]

    for error in errors:
        status = error.to_status()
        assert metadata_bytes(status) <= STATUS_METADATA_BUDGET
    assert listed(errors[0]), "violations are cut, never all dropped"
