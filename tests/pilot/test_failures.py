"""Error text of a failed run, taken from its stderr as the original's LogParser does."""

from __future__ import annotations

from services.pilot.failures import ContainerRunError, TaskTimeoutError, extract_error

TRACEBACK = """\
starting
Traceback (most recent call last):
  File "a.py", line 1, in <module>
    x()
ValueError: first
Traceback (most recent call last):
  File "b.py", line 2, in <module>
    y()
    ^^^
KeyError: 'the last one'
cleanup done
"""


def test_the_last_python_traceback_wins() -> None:
    assert extract_error(TRACEBACK) == "KeyError: 'the last one'"


def test_else_the_last_non_empty_line() -> None:
    assert extract_error("one\ntwo\n\n  \n") == "two"


def test_apptainer_noise_is_skipped_unless_it_is_all_there_is() -> None:
    assert extract_error("real problem\nINFO:    Cleaning up\n") == "real problem"
    assert (
        extract_error("INFO:    x\nFATAL:   could not open image\n")
        == "[Apptainer-Error] FATAL:   could not open image"
    )


def test_empty_stderr_gives_empty_text() -> None:
    assert extract_error("") == ""


def test_okay_errors_match_any_class_in_the_hierarchy() -> None:
    err = TaskTimeoutError("late")
    assert err.matches(frozenset({"ContainerRunError"}))
    assert err.matches(frozenset({"TaskTimeoutError"}))
    assert not ContainerRunError("x").matches(frozenset({"TaskTimeoutError"}))
    assert str(err) == "late"
