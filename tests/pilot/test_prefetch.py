"""The adaptive prefetch (``services/pilot/prefetch.py``): more deliveries held while tasks are
short, the base for long ones, and no flapping on noisy lengths."""

from __future__ import annotations

import random

from services.pilot.prefetch import MAX_PREFETCH, WINDOW, AdaptivePrefetch, base_prefetch


def feed(adaptive: AdaptivePrefetch, lengths: list[float]) -> list[int]:
    """The changes it asks for while ``lengths`` are observed."""
    return [p for length in lengths if (p := adaptive.observe(length)) is not None]


def test_short_tasks_raise_it_once_to_the_cap_per_slot() -> None:
    adaptive = AdaptivePrefetch(1, base_prefetch(1))
    assert feed(adaptive, [0.003] * (WINDOW - 1)) == []  # no decision before a window is full
    assert feed(adaptive, [0.003]) == [16]  # base 4 + at most 12 per slot
    assert feed(adaptive, [0.003] * WINDOW * 5) == []


def test_long_tasks_keep_the_base_and_a_slowdown_brings_it_back() -> None:
    adaptive = AdaptivePrefetch(2, base_prefetch(2))
    assert feed(adaptive, [1.0] * WINDOW * 3) == []  # 50 ms of 1 s tasks: nothing extra
    assert feed(adaptive, [0.002] * WINDOW) == [31]  # base 7 + 24 for two slots
    assert feed(adaptive, [2.0] * WINDOW) == [8]  # tasks got long: the base and one


def test_noisy_short_lengths_do_not_flap_it() -> None:
    rng = random.Random(7)
    adaptive = AdaptivePrefetch(1, base_prefetch(1))
    lengths = [rng.uniform(0.0005, 0.006) * (50 if rng.random() < 0.05 else 1) for _ in range(2000)]
    assert feed(adaptive, lengths) == [16]


def test_many_slots_stay_under_the_overall_cap() -> None:
    adaptive = AdaptivePrefetch(8, base_prefetch(8))
    assert feed(adaptive, [0.001] * WINDOW) == [MAX_PREFETCH]  # not 25 + 96
