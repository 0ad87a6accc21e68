"""RetryPolicy: back-off per attempt, the cap, equal jitter, Retry-After, exhaustion, defaults."""

from __future__ import annotations

import random

import pytest

from app.engine.retry import RetryPolicy

DRAWS = 2000


def policy(backoff: str, initial: int = 1000, cap: int = 60_000, attempts: int = 5) -> RetryPolicy:
    return RetryPolicy(max_attempts=attempts, backoff=backoff, initial_delay_ms=initial, max_delay_ms=cap)


# ------------------------------------------------------------------ base delays


@pytest.mark.parametrize(
    ("backoff", "expected"),
    [
        ("exponential", [1000, 2000, 4000, 8000, 16000, 32000]),
        ("linear", [1000, 2000, 3000, 4000, 5000, 6000]),
        ("fixed", [1000, 1000, 1000, 1000, 1000, 1000]),
    ],
)
def test_base_delay_per_attempt(backoff: str, expected: list[int]) -> None:
    p = policy(backoff)
    assert [p.base_delay_ms(n) for n in range(1, 7)] == expected


@pytest.mark.parametrize(
    ("backoff", "attempt", "expected"),
    [
        ("exponential", 6, 32_000),
        ("exponential", 7, 50_000),  # 64 000 capped
        ("exponential", 40, 50_000),  # no overflow, still capped
        ("linear", 50, 50_000),
        ("linear", 51, 50_000),
        ("linear", 49, 49_000),
        ("fixed", 100, 1000),
    ],
)
def test_base_delay_is_capped_at_max_delay(backoff: str, attempt: int, expected: int) -> None:
    assert policy(backoff, cap=50_000).base_delay_ms(attempt) == expected


def test_an_initial_delay_above_the_cap_is_capped() -> None:
    for backoff in ("exponential", "linear", "fixed"):
        assert policy(backoff, initial=90_000, cap=10_000).base_delay_ms(1) == 10_000


def test_an_unknown_backoff_name_backs_off_exponentially() -> None:
    assert [policy("bogus").base_delay_ms(n) for n in (1, 2, 3)] == [1000, 2000, 4000]


# ------------------------------------------------------------------ jitter


@pytest.mark.parametrize("backoff", ["exponential", "linear", "fixed"])
@pytest.mark.parametrize("attempt", [1, 2, 3, 8])
def test_jitter_stays_within_half_and_full_base(backoff: str, attempt: int) -> None:
    p = policy(backoff, cap=20_000)
    base = p.base_delay_ms(attempt)
    rand = random.Random(1234 + attempt)
    draws = [p.delay_ms(attempt, rand=rand) for _ in range(DRAWS)]
    assert all(base // 2 <= d <= base for d in draws), (base, min(draws), max(draws))
    assert all(isinstance(d, int) for d in draws)
    # Spread over the whole band, both ends reachable in principle: the draws are not constant.
    assert len(set(draws)) > 50
    assert min(draws) < base // 2 + base // 10 and max(draws) > base - base // 10


def test_jitter_is_reproducible_with_a_seeded_random() -> None:
    p = policy("exponential")
    first = [p.delay_ms(3, rand=random.Random(7)) for _ in range(5)]
    second = [p.delay_ms(3, rand=random.Random(7)) for _ in range(5)]
    assert first == second


def test_jitter_reaches_both_ends_of_the_band() -> None:
    p = policy("fixed", initial=10)
    draws = {p.delay_ms(1, rand=random.Random(seed)) for seed in range(500)}
    assert draws == set(range(5, 11))


@pytest.mark.parametrize("initial", [0, 1])
def test_tiny_delays_have_no_jitter(initial: int) -> None:
    p = policy("fixed", initial=initial)
    assert {p.delay_ms(1, rand=random.Random(s)) for s in range(50)} == {initial}


def test_the_default_random_source_stays_in_the_band() -> None:
    p = policy("linear")
    for _ in range(200):
        assert 1000 <= p.delay_ms(2) <= 2000


# ------------------------------------------------------------------ Retry-After


def test_retry_after_longer_than_the_backoff_is_honoured() -> None:
    p = policy("exponential")
    rand = random.Random(0)
    assert all(p.delay_ms(1, retry_after_ms=5000, rand=rand) == 5000 for _ in range(200))


def test_retry_after_shorter_than_the_backoff_does_not_shorten_it() -> None:
    p = policy("exponential")
    rand = random.Random(0)
    for _ in range(200):
        assert 4000 <= p.delay_ms(4, retry_after_ms=10, rand=rand) <= 8000


def test_retry_after_is_capped_at_max_delay() -> None:
    p = policy("exponential", cap=30_000)
    assert p.delay_ms(1, retry_after_ms=3_600_000, rand=random.Random(0)) == 30_000


@pytest.mark.parametrize("retry_after", [None, 0])
def test_no_retry_after_means_the_backoff(retry_after: int | None) -> None:
    p = policy("fixed", initial=4000)
    assert 2000 <= p.delay_ms(1, retry_after_ms=retry_after, rand=random.Random(3)) <= 4000


# ------------------------------------------------------------------ attempts


def test_exhausted() -> None:
    p = RetryPolicy(max_attempts=3)
    assert [p.exhausted(n) for n in (1, 2, 3, 4)] == [False, False, True, True]


def test_one_attempt_is_exhausted_at_once() -> None:
    assert RetryPolicy().exhausted(1)


# ------------------------------------------------------------------ from a step definition


def test_of_defaults_with_no_retry_block() -> None:
    p = RetryPolicy.of({"id": "a", "action": "transform"})
    assert p == RetryPolicy(max_attempts=1, backoff="exponential", initial_delay_ms=1000, max_delay_ms=60_000)
    assert p.exhausted(1)


@pytest.mark.parametrize("retry", [None, {}])
def test_of_an_empty_or_null_retry_block(retry: dict | None) -> None:
    assert RetryPolicy.of({"retry": retry}) == RetryPolicy()


def test_of_a_partial_retry_block_keeps_the_other_defaults() -> None:
    p = RetryPolicy.of({"retry": {"maxAttempts": 4}})
    assert (p.max_attempts, p.backoff, p.initial_delay_ms, p.max_delay_ms) == (4, "exponential", 1000, 60_000)


def test_of_a_full_retry_block() -> None:
    step = {
        "retry": {"maxAttempts": 3, "backoff": "linear", "initialDelayMs": 250, "maxDelayMs": 600},
    }
    p = RetryPolicy.of(step)
    assert p == RetryPolicy(max_attempts=3, backoff="linear", initial_delay_ms=250, max_delay_ms=600)
    assert [p.base_delay_ms(n) for n in (1, 2, 3)] == [250, 500, 600]


def test_a_policy_is_immutable() -> None:
    with pytest.raises(AttributeError):
        RetryPolicy().max_attempts = 2  # type: ignore[misc]
