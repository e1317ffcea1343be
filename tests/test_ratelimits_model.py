"""The GCRA of gateway/core/ratelimits.py against a plain token bucket in exact fractions, with clock
steps forward and back; Retry-After; the headers' words (pure: no server, no database)."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import ratelimits
from gateway.core.ratelimits import SECOND_US, Limit


class TokenBucket:
    """The reference: `limit` tokens at most, refilled at `limit / per` a microsecond, in fractions."""

    def __init__(self, limit: int, per_us: int) -> None:
        self.capacity = Fraction(limit)
        self.rate = Fraction(limit, per_us)
        self.tokens = self.capacity
        self.at: int | None = None

    def take(self, now: int, weight: int) -> bool:
        if self.at is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if weight == 0 or self.tokens >= weight:
            self.tokens -= weight
            return True
        return False


def _gcra(kind: str, limit: int, per_us: int, calls: list[tuple[int, int]]) -> list[bool]:
    tat = 0
    out = []
    for now, weight in calls:
        inc = ratelimits.increment(kind, limit, per_us, weight)
        ok = ratelimits.admits(tat, now, inc, per_us)
        if ok:
            tat = ratelimits.advanced(tat, now, inc)
        out.append(ok)
    return out


# A clock: steps (microseconds) from a start; forward only, or with steps back.
STEPS_FORWARD = st.lists(st.integers(0, 3 * SECOND_US), min_size=1, max_size=60)
STEPS_ANY = st.lists(st.integers(-3 * SECOND_US, 3 * SECOND_US), min_size=1, max_size=60)


def _times(start: int, steps: list[int]) -> list[int]:
    times, now = [], start
    for step in steps:
        now += step
        times.append(now)
    return times


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 50),
    seconds=st.sampled_from([1, 60, 3600]),
    steps=STEPS_FORWARD,
    start=st.integers(10**15, 2 * 10**15),
)
def test_requests_match_a_token_bucket_on_a_clock_that_goes_forward(
    limit: int, seconds: int, steps: list[int], start: int
) -> None:
    # `per` a multiple of `limit`, so that the bucket's refill is whole microseconds a request, as
    # the GCRA's increment is (else the GCRA rounds the increment down: never fewer admitted).
    per_us = seconds * SECOND_US // limit * limit
    calls = [(now, 1) for now in _times(start, steps)]
    bucket = TokenBucket(limit, per_us)
    assert _gcra("requests", limit, per_us, calls) == [bucket.take(now, w) for now, w in calls]


@settings(max_examples=300, deadline=None)
@given(
    limit_credits=st.integers(1, 20),
    weights=st.lists(st.integers(0, 5), min_size=1, max_size=60),
    steps=STEPS_FORWARD,
)
def test_credits_match_a_token_bucket_weighed_by_cost(
    limit_credits: int, weights: list[int], steps: list[int]
) -> None:
    limit = limit_credits * 100_000  # micro-credits; requests cost 0 to 0.5 credits
    per_us = 60 * SECOND_US
    times = _times(10**15, steps)
    calls = [(now, w * 100_000) for now, w in zip(times, weights, strict=False)]
    bucket = TokenBucket(limit, per_us)
    assert _gcra("credits", limit, per_us, calls) == [bucket.take(now, w) for now, w in calls]


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(1, 30), seconds=st.sampled_from([1, 60]), steps=STEPS_ANY)
def test_a_clock_stepping_back_never_lends_more(limit: int, seconds: int, steps: list[int]) -> None:
    """Whatever the clock does, no more is admitted than the rate allows over the span of times it
    showed (a burst of `limit`, then one each `per / limit`); and at any state, a time earlier
    admits only what a later time admits."""
    per_us = seconds * SECOND_US
    inc = per_us // limit
    times = _times(10**15, steps)
    admitted = _gcra("requests", limit, per_us, [(now, 1) for now in times])
    span = max(times) - times[0]
    assert sum(admitted) <= limit + span // inc + 1
    tat = 0
    for now, ok in zip(times, admitted, strict=True):
        for earlier in (now - SECOND_US, now - 1):
            if ratelimits.admits(tat, earlier, inc, per_us):
                assert ratelimits.admits(tat, now, inc, per_us)
        if ok:
            tat = ratelimits.advanced(tat, now, inc)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 20),
    seconds=st.sampled_from([1, 60, 3600]),
    steps=STEPS_ANY,
    weight=st.integers(1, 3),
)
def test_retry_after_is_honest_and_not_too_long(
    limit: int, seconds: int, steps: list[int], weight: int
) -> None:
    per_us = seconds * SECOND_US
    tat = 0
    for now in _times(10**15, steps):
        inc = ratelimits.increment("requests", limit, per_us, 1) * weight
        if ratelimits.admits(tat, now, inc, per_us):
            tat = ratelimits.advanced(tat, now, inc)
            continue
        wait = ratelimits.retry_after(tat, now, inc, per_us)
        if inc > per_us:
            assert wait is None
            continue
        assert wait is not None and wait >= 1
        assert ratelimits.admits(tat, now + wait * SECOND_US, inc, per_us)
        if wait > 1:
            assert not ratelimits.admits(tat, now + (wait - 1) * SECOND_US, inc, per_us)
        # A refusal does not move the arrival time.


def test_ten_a_minute_from_rest_then_one_each_six_seconds() -> None:
    per_us, limit = 60 * SECOND_US, 10
    now = 10**15
    admitted = _gcra("requests", limit, per_us, [(now, 1)] * 11)
    assert admitted == [True] * 10 + [False]
    tat = now + 10 * 6 * SECOND_US
    assert ratelimits.retry_after(tat, now, 6 * SECOND_US, per_us) == 6
    # No window boundary: 10 at the end of one minute and 10 at the start of the next is not allowed.
    calls = [(now + 59 * SECOND_US, 1)] * 10 + [(now + 61 * SECOND_US, 1)] * 10
    assert sum(_gcra("requests", limit, per_us, calls)) == 10


def test_headers_and_their_words() -> None:
    assert [ratelimits.reset_text(us) for us in (0, -5, 1_500, 1_000_000, 360_000_000, 3_723_000_000)] == [
        "0s",
        "0s",
        "2ms",
        "1s",
        "6m0s",
        "1h2m3s",
    ]
    now = 10**15
    rpm = Limit(1, "key", "requests", 10, 60 * SECOND_US, "key_a")
    tight = Limit(2, "user", "requests", 100, 3600 * SECOND_US, "7")
    credits = Limit(3, "team", "credits", 500_000, 60 * SECOND_US, "1")
    slots = Limit(4, "team", "concurrent", 3, 0, "1")
    headers = ratelimits.rate_headers(
        [(rpm, now + 12 * SECOND_US), (tight, now), (credits, now + 30 * SECOND_US), (slots, 0)], now
    )
    assert headers == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "8",
        "x-ratelimit-reset-requests": "12s",
        "x-ratelimit-limit-credits": "0.5",
        "x-ratelimit-remaining-credits": "0.25",
        "x-ratelimit-reset-credits": "30s",
    }


def test_the_refusal_names_the_limit() -> None:
    now = 10**15
    limit = Limit(1, "key", "requests", 10, 60 * SECOND_US, "key_a")
    error = ratelimits.refused(limit, "key_a", now + 60 * SECOND_US, 0, now, 100_000)
    assert error.status == 429 and error.type == "rate_limited"
    assert {k: error.details[k] for k in ("scope", "subject", "kind", "limit", "per")} == {
        "scope": "key",
        "subject": "key_a",
        "kind": "requests",
        "limit": 10,
        "per": "minute",
    }
    assert error.headers["Retry-After"] == "6"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    too_big = Limit(2, "user", "credits", 100_000, 60 * SECOND_US, "7")
    never = ratelimits.refused(too_big, "alice", 0, 0, now, 300_000)
    assert "Retry-After" not in never.headers and never.details["retry_after"] is None
    assert "never" in never.message
