"""Metering's records: who calls (`Caller`), what a request costs (`Charge`), what admission placed
(`Admission`) and how it ended (`Settlement`); the units of work that move money are in `admission`
(holds placed), `settlement` (charges and releases) and `expiry` (holds of stopped processes).

Counters change only through conditional updates, so admission is exact under any concurrency and
across processes sharing one database: a counter row is updated only if `spent + held + cost <=
limit` still holds when the database applies it. Counters are always touched in one fixed order
(scope rank, then budget id), so concurrent transactions on PostgreSQL cannot deadlock.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from gateway.errors import BudgetExceeded, RateLimited, Unauthorized


def joined(tags: tuple[str, ...]) -> str | None:
    """Tags as holds and ledger rows store them: comma-separated (a tag has no comma), NULL for none."""
    return ",".join(tags) if tags else None


Refusal = BudgetExceeded | RateLimited | Unauthorized


# The records of a request's way through metering: made several times a request, so plain slotted
# dataclasses, never changed once made. (frozen=True would say so, but its __init__ sets each field
# through object.__setattr__: measured with callgrind, 4% of the gateway's instructions a request.)
@dataclass(slots=True)
class Caller:
    """Who a gateway key belongs to."""

    key_id: str
    user_id: int
    user_name: str
    team_id: int | None
    team_name: str | None
    # The models the key may use (its, its user's and its team's allow-lists met); None: every one.
    models: frozenset[str] | None = None
    # When the key stops working (expiry, or the end of a rotation's grace), and the reason then.
    ends_at: int | None = None
    ends_why: str = ""
    # Whether a rate or concurrency limit may apply (on the key, user, team, or the user's end
    # users), decided when the key is loaded: admission reads limits only for callers that have one.
    limited: bool = False


@dataclass(slots=True)
class Charge:
    """A priced request about to be admitted."""

    request_id: str
    caller: Caller
    model: str
    message_count: int
    unit_price: int
    credits: int
    stream: bool
    end_user: str | None = None  # whom the caller serves (contract §11), None when not said
    tags: tuple[str, ...] = ()


@dataclass(slots=True)
class Admission:
    """An admitted request: the budget windows it holds on and what they have left after it."""

    charge: Charge
    admitted_at: int  # microseconds since the epoch
    allocations: tuple[tuple[int, int], ...]  # (budget_id, window_start), in lock order
    remaining: int | None  # smallest remaining micro-credits across the budgets; None when none applies
    rate_headers: dict[str, str] | None = None  # x-ratelimit-* after it, when a rate limit applies


@dataclass(slots=True)
class Settlement:
    """How an admitted request ended, as the ledger records it."""

    outcome: str  # charged, upstream_error, upstream_unavailable, upstream_timeout, expired
    upstream_status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


def now_us() -> int:
    """Now, in integer microseconds since the epoch."""
    return time.time_ns() // 1_000


def new_request_id() -> str:
    """32 hex digits: the time in microseconds, then 72 random bits (an id, not a secret).

    Ids that grow with time are appended at the right edge of the holds, allocations and ledger
    indexes, where random ones would dirty a different page of each for every request.
    """
    return f"{now_us():014x}{random.getrandbits(72):018x}"
