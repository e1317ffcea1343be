"""Pricing and windows: pure functions, exact arithmetic (property tests)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.pricing import DEFAULT_PRICES, PriceTable, cost, credits_json, format_credits, parse_credits
from gateway.windows import PERIODS, window_end, window_start

micros = st.integers(min_value=0, max_value=10**15)


@given(micros)
def test_format_then_parse_is_exact(amount: int) -> None:
    assert parse_credits(format_credits(amount)) == amount
    assert Decimal(format_credits(amount)) * 1_000_000 == amount


@given(st.integers(min_value=0, max_value=10**12))
def test_json_number_round_trips(amount: int) -> None:
    assert parse_credits(credits_json(amount)) == amount


@given(st.integers(min_value=1, max_value=10_000), st.sampled_from(sorted(DEFAULT_PRICES)))
def test_cost_is_messages_times_price_exactly(messages: int, model: str) -> None:
    price = PriceTable.from_config().unit_price(model)
    assert price is not None
    assert Decimal(format_credits(cost(messages, price))) == messages * Decimal(DEFAULT_PRICES[model])


@pytest.mark.parametrize(
    ("text", "micros"), [("0.1", 100_000), ("0.25", 250_000), ("3", 3_000_000), (0.15, 150_000), ("1e-6", 1)]
)
def test_parse(text: object, micros: int) -> None:
    assert parse_credits(text) == micros


@pytest.mark.parametrize("bad", ["0.0000001", "-1", "abc", "nan", "inf", None, True, [1]])
def test_parse_refuses(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_credits(bad)


def test_defaults() -> None:
    table = PriceTable.from_config()
    assert [(m, format_credits(p)) for m, p in table.items()] == sorted(DEFAULT_PRICES.items())
    overridden = PriceTable.from_config({"openai/gpt-oss-20b": 0.2, "acme/new": "1.5"})
    assert overridden.unit_price("openai/gpt-oss-20b") == 200_000
    assert overridden.unit_price("acme/new") == 1_500_000
    assert overridden.unit_price("nope") is None


moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))


@given(moments, st.sampled_from(PERIODS))
def test_window_contains_the_moment(moment: datetime, period: str) -> None:
    start = window_start(period, moment)
    end = window_end(period, start)
    assert start <= moment
    if end is not None:
        assert moment < end
        assert window_start(period, end) == end  # windows tile time with no gap
        assert window_start(period, end - timedelta(microseconds=1)) == start


def test_window_shapes() -> None:
    moment = datetime(2026, 11, 25, 20, 30, tzinfo=UTC)  # a Wednesday
    assert window_start("daily", moment) == datetime(2026, 11, 25, tzinfo=UTC)
    assert window_start("weekly", moment) == datetime(2026, 11, 23, tzinfo=UTC)
    assert window_start("monthly", moment) == datetime(2026, 11, 1, tzinfo=UTC)
    assert window_end("monthly", datetime(2026, 12, 1, tzinfo=UTC)) == datetime(2027, 1, 1, tzinfo=UTC)
    assert window_end("total", window_start("total", moment)) is None
