"""Rate and concurrency limits (contract §13): the GCRA arithmetic, the refusal and the headers (pure,
no I/O); `admission_sqlite` and `gateway_admit_batch` (migration 0012) apply them to a batch.

A rate of `limit` per `per` is a GCRA (generic cell rate algorithm, the token bucket said with one
number): each limit and subject keeps a theoretical arrival time `tat`. A request of weight `w` (1
for `requests`, its micro-credits for `credits`) moves it by `inc = w * per // limit`, and is
admitted when `max(tat, now) + inc - now <= per`: a burst of `limit` from rest, then one each
`per / limit`. No window has a boundary, so no boundary lets twice the rate through, and a refused
request does not move `tat`. A clock that steps back cannot lend more: `tat` never goes back.
`concurrent` counts the subject's open holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.core.pricing import credits_json, format_credits
from gateway.errors import RateLimited

SECOND_US = 1_000_000
PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
PERIOD_NAMES = {seconds: name for name, seconds in PERIODS.items()}
KINDS = ("requests", "credits", "concurrent")
# The Retry-After of a `concurrent` refusal: when a slot frees is not known in advance.
CONCURRENT_RETRY_SECONDS = 1


@dataclass(slots=True)
class Limit:
    """A limit as admission applies it to one request: `per_us` 0 for `concurrent`; `state` the
    subject its state is kept for (the end user's own under a default `USER_ID/*`)."""

    id: int
    scope: str
    kind: str
    limit: int  # requests, micro-credits, or requests in flight
    per_us: int
    state: str


def increment(kind: str, limit: int, per_us: int, credits: int) -> int:
    """How far a request moves a rate's theoretical arrival time (0: it takes nothing from it)."""
    return (1 if kind == "requests" else credits) * per_us // limit


def admits(tat: int, now: int, inc: int, per_us: int) -> bool:
    """Whether a rate whose arrival time is `tat` admits a request of increment `inc` at `now`."""
    return inc == 0 or max(tat, now) + inc - now <= per_us


def advanced(tat: int, now: int, inc: int) -> int:
    """The arrival time after admitting a request of increment `inc` at `now`."""
    return max(tat, now) + inc if inc > 0 else tat


def retry_after(tat: int, now: int, inc: int, per_us: int) -> int | None:
    """Whole seconds from `now` until a request of increment `inc` would be admitted (if nothing else
    is admitted meanwhile); None when it never would (it weighs more than the whole rate)."""
    if inc > per_us:
        return None
    wait = max(tat, now) + inc - per_us - now
    return max(-(-wait // SECOND_US), 1)


def remaining(kind: str, limit: int, per_us: int, tat: int, now: int) -> int:
    """What the rate has left at `now` with its arrival time at `tat`: requests, or micro-credits."""
    room = per_us - max(tat - now, 0)
    if kind == "requests":
        return min(room // (per_us // limit), limit)
    return min(room * limit // per_us, limit)


def reset_text(micros: int) -> str:
    """A duration as OpenAI's x-ratelimit-reset-* headers write it: "20ms", "1s", "6m0s", "1h2m3s"."""
    if micros <= 0:
        return "0s"
    if micros < SECOND_US:
        return f"{-(-micros // 1000)}ms"
    seconds = -(-micros // SECOND_US)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


def rate_headers(figures: Sequence[tuple[Limit, int]], now: int) -> dict[str, str]:
    """The x-ratelimit-* headers of the request and credit rates that apply, after this request: each
    kind's tightest (least remaining). `figures`: each limit with its arrival time (`concurrent`
    limits are left out: OpenAI has no header for them)."""
    tightest: dict[str, tuple[int, Limit, int]] = {}
    for limit, tat in figures:
        if limit.kind == "concurrent":
            continue
        left = remaining(limit.kind, limit.limit, limit.per_us, tat, now)
        known = tightest.get(limit.kind)
        if known is None or left * known[1].limit < known[0] * limit.limit:
            tightest[limit.kind] = (left, limit, tat)
    headers: dict[str, str] = {}
    for kind, (left, limit, tat) in tightest.items():
        shown = str if kind == "requests" else format_credits
        headers[f"x-ratelimit-limit-{kind}"] = shown(limit.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = shown(max(left, 0))
        headers[f"x-ratelimit-reset-{kind}"] = reset_text(tat - now)
    return headers


def limit_json(
    limit_id: int, scope: str, name: str, kind: str, value: int, per_seconds: int, stored: str
) -> dict[str, Any]:
    """A limit as the admin API shows it (`name`: its subject as people name it)."""
    return {
        "id": limit_id,
        "scope": scope,
        "subject": name,
        "kind": kind,
        "limit": credits_json(value) if kind == "credits" else int(value),
        "per": PERIOD_NAMES.get(per_seconds) if per_seconds else None,
        "default": scope == "end_user" and stored.endswith("/*"),
    }


def subject_name(scope: str, state: str, key_id: str, user_name: str, team_name: str | None) -> str:
    """A limit's subject as the admin API names it: key id, user or team name, or USER/END_USER."""
    if scope == "key":
        return key_id
    if scope == "user":
        return user_name
    if scope == "team":
        return team_name or ""
    return f"{user_name}/{state.partition('/')[2]}"


def refused(limit: Limit, subject: str, tat: int, in_flight: int, now: int, credits: int) -> RateLimited:
    """The 429 of a request a limit does not admit: which limit, and when to come back."""
    if limit.kind == "concurrent":
        wait: int | None = CONCURRENT_RETRY_SECONDS
        what = f"{limit.limit} requests in flight ({in_flight} are)"
        per = None
        shown: int | float | object = limit.limit
    else:
        wait = retry_after(tat, now, increment(limit.kind, limit.limit, limit.per_us, credits), limit.per_us)
        per = PERIOD_NAMES.get(limit.per_us // SECOND_US, f"{limit.per_us // SECOND_US}s")
        amount = str(limit.limit) if limit.kind == "requests" else format_credits(limit.limit)
        what = f"{amount} {limit.kind} per {per}"
        shown = limit.limit if limit.kind == "requests" else credits_json(limit.limit)
    whose = f"{limit.scope} {subject!r}"
    if wait is None:
        advice = (
            f"This request costs {format_credits(credits)} credits, more than the whole rate: it can "
            "never be admitted under this limit; ask an administrator to raise it."
        )
    else:
        advice = f"Retry in {wait} s; nothing was charged."
    error = RateLimited(
        f"Rate limit of {whose} reached: {what}. {advice}",
        scope=limit.scope,
        subject=subject,
        kind=limit.kind,
        limit=shown,
        per=per,
        retry_after=wait,
    )
    headers = {} if wait is None else {"Retry-After": str(wait)}
    if limit.kind != "concurrent":
        headers.update(rate_headers([(limit, tat)], now))
    error.headers = headers
    return error
