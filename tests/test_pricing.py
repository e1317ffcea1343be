"""Pricing and windows: pure functions, exact arithmetic (property tests)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.pricing import DEFAULT_PRICES, PriceTable, cost, credits_json, format_credits, parse_credits
from gateway.core.windows import PERIODS, window_end, window_start
from gateway.jsonout import dumps

micros = st.integers(min_value=0, max_value=10**15)


@given(micros)
def test_format_then_parse_is_exact(amount: int) -> None:
    assert parse_credits(format_credits(amount)) == amount
    assert Decimal(format_credits(amount)) * 1_000_000 == amount


@given(st.integers(min_value=0, max_value=10**12))
def test_json_number_round_trips(amount: int) -> None:
    assert parse_credits(credits_json(amount)) == amount


# Every amount a 64-bit micro-credit column holds, and the small and 15-digit edges around them.
any_micros = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.integers(min_value=10**15 - 10**4, max_value=10**15 + 10**4),
)


@given(any_micros)
def test_json_credits_are_the_exact_decimal(amount: int) -> None:
    text = dumps({"credits": credits_json(amount)})
    assert json.loads(text, parse_float=Decimal)["credits"] == Decimal(amount) / 1_000_000
    # Written as the plain decimal, never 1e-06 or 17 rounded digits.
    assert text == f'{{"credits": {format_credits(amount)}}}'
    if amount >= 0:
        assert parse_credits(json.loads(text, parse_float=Decimal)["credits"]) == amount


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (123456789012345678, "123456789012.345678"),
        (750_000, "0.75"),
        (3_000_000, "3"),
        (0, "0"),
        (1, "0.000001"),
        (99, "0.000099"),
        (100, "0.0001"),
        (999_999_999_999_999, "999999999.999999"),
        (1_000_000_000_000_001, "1000000000.000001"),
        (2**63 - 1, "9223372036854.775807"),
    ],
)
def test_json_credits_examples(micros: int, text: str) -> None:
    assert dumps(credits_json(micros)) == text
    assert dumps([credits_json(micros)], indent=2) == f"[\n  {text}\n]"
    assert str(credits_json(micros)) == text  # what the CLI's tables show


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values, st.sampled_from([None, 2]))
def test_dumps_writes_what_json_dumps_writes(value: Any, indent: int | None) -> None:
    assert dumps(value, indent=indent) == json.dumps(value, indent=indent)
    # With a Decimal in it the document is written by dumps itself, and still reads the same.
    with_decimal = [value, Decimal("0.5")]
    assert dumps(with_decimal, indent=indent) == json.dumps([value, 0.5], indent=indent)


@pytest.mark.parametrize(
    "bad",
    [float("nan"), float("inf"), [Decimal("NaN")], {"x": Decimal("Infinity")}, [Decimal(1), float("nan")]],
)
def test_dumps_refuses_what_is_not_json(bad: object) -> None:
    with pytest.raises(ValueError):
        dumps(bad)


@pytest.mark.parametrize("bad", [object(), [Decimal(1), object()], {1: Decimal(1)}, {Decimal(1): 2}])
def test_dumps_refuses_what_json_cannot_hold(bad: object) -> None:
    with pytest.raises(TypeError):
        dumps(bad)


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


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        (Decimal("123456789012.345678"), 123456789012345678),  # a JSON number the admin API parsed
        ("9223372036854.775807", 2**63 - 1),
        ("1." + "0" * 1000, 1_000_000),
        ("0e999999999", 0),
    ],
)
def test_parse_is_exact_past_28_digits(text: object, micros: int) -> None:
    assert parse_credits(text) == micros


@pytest.mark.parametrize(
    "bad",
    [
        "0.0000001",
        "-1",
        "abc",
        "nan",
        "inf",
        None,
        True,
        [1],
        # The default decimal context rounds these to 28 digits, to 1 and 0.
        "1.0000000000000000000000000001",
        Decimal("0.0000000000000000000000000000001"),
        "1e-9999999",
        "1e999999",  # overflowed the default decimal context: not even a ValueError
        "-1e999999",
        "1e24",
    ],
)
def test_parse_refuses(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_credits(bad)


def test_parse_shows_a_json_number_as_written() -> None:
    with pytest.raises(ValueError, match=r"^0\.1234567 has more than 6 decimal places$"):
        parse_credits(Decimal("0.1234567"))


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
