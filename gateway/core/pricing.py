"""Pricing: credits per message, held as exact integer micro-credits (pure, no I/O)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from decimal import Context, Decimal, Inexact, InvalidOperation

MICROS = 1_000_000

# Scaling to micros must be exact: the default context rounds to 28 digits, which would take
# 1.0000000000000000000000000001 for 1. Sixty digits hold any amount under 10**24 credits to a
# millionth of a micro-credit, so rounding here means a fraction of a micro-credit.
_EXACT = Context(prec=60, traps=[Inexact])
_TOO_LARGE = 24  # the decimal exponent of 10**24 credits, far past any 64-bit amount

DEFAULT_PRICES: Mapping[str, str] = {
    "openai/gpt-oss-20b": "0.1",
    "openai/gpt-oss-120b": "0.25",
    "google/gemini-2.5-flash-lite": "0.15",
    "google/gemini-2.5-flash": "1",
    "google/gemini-2.5-pro": "3",
}


def parse_credits(value: object, *, allow_zero: bool = True) -> int:
    """Turn a credit amount (number or decimal string, at most 6 decimals) into micro-credits.

    Raises ValueError with a message fit for a person.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError(f"expected a number of credits, got {value!r}")
    # A Decimal comes from a JSON number (the admin API parses them so): show it as it was written.
    shown = str(value) if isinstance(value, Decimal) else repr(value)
    try:
        # str() first so that a float such as 0.1 means the decimal 0.1, not its binary neighbour.
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"expected a number of credits, got {shown}") from None
    if not amount.is_finite():
        raise ValueError(f"expected a finite number of credits, got {shown}")
    if amount < 0 or (not amount and not allow_zero):
        raise ValueError(f"{shown} must be {'zero or more' if allow_zero else 'more than zero'}")
    if amount and amount.adjusted() >= _TOO_LARGE:
        raise ValueError(f"{shown} is too large")  # before scaling: 1e999999 would overflow it
    try:
        micros = amount.scaleb(6, _EXACT)
        exact = micros == micros.to_integral_value()
    except Inexact:
        exact = False
    if not exact:
        raise ValueError(f"{shown} has more than 6 decimal places")
    return int(micros)


# Each answer's credit headers format two amounts, and few distinct ones recur: remembered.
@functools.lru_cache(maxsize=4096)
def format_credits(micros: int) -> str:
    """Render micro-credits as the shortest exact decimal string, e.g. 750000 -> '0.75'."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:06d}".rstrip("0")


def credits_json(micros: int) -> int | float | Decimal:
    """Micro-credits as a JSON number that `jsonout.dumps` writes exactly: 3, 0.75, 123456789012.345678.

    An int when whole. Else the float nearest (int / int is correctly rounded) when its repr is the
    exact decimal: from 0.0001 (repr's fixed notation) to 15 significant digits (a double keeps any
    15, so no shorter repr exists). Else a Decimal: json.dumps cannot write one, so dumps writes it.
    """
    whole, frac = divmod(micros, MICROS)
    if not frac:
        return whole
    if 100 <= abs(micros) < 10**15:
        return micros / MICROS
    return Decimal(format_credits(micros))


class PriceTable:
    """Credits per message for each model, in micro-credits."""

    def __init__(self, prices: Mapping[str, int]) -> None:
        self._prices = dict(prices)

    @classmethod
    def from_config(cls, overrides: Mapping[str, object] | None = None) -> PriceTable:
        """Defaults from the contract, extended or overridden by the TOML [pricing] table."""
        merged: dict[str, object] = dict(DEFAULT_PRICES)
        merged.update(overrides or {})
        prices: dict[str, int] = {}
        for model, price in merged.items():
            try:
                prices[model] = parse_credits(price)
            except ValueError as exc:
                raise ValueError(f"pricing.{model!r}: {exc}") from None
        return cls(prices)

    def unit_price(self, model: str) -> int | None:
        """Micro-credits per message, or None for a model not in the table."""
        return self._prices.get(model)

    def models(self) -> list[str]:
        """The priced models, sorted."""
        return sorted(self._prices)

    def items(self) -> list[tuple[str, int]]:
        """(model, micro-credits per message) pairs, sorted by model."""
        return sorted(self._prices.items())


def cost(message_count: int, unit_price: int) -> int:
    """Micro-credits for a request: every message counts, system messages included."""
    return message_count * unit_price
