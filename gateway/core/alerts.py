"""Budget alert thresholds (pure, no I/O): which thresholds a budget's spending has reached.

A threshold is a whole percentage of a budget's limit, 1 to 1000 (past 100: a soft budget's
overspend). Spending `spent` has reached threshold `t` of `limit` when it is above zero and
`spent * 100 >= t * limit`, in integers, so no rounding ever decides it. A settlement that takes
`spent` from `before` to `after` crosses each threshold reached at `after` and not at `before`;
the database keeps one event per (budget, window, threshold) (see migration 0008), so crossing
again in the same window, by any process, adds nothing.

A budget's own `alert_at` is stored as text, the thresholds comma-separated in ascending order
("50,80,100"; "" for none); NULL stands for the configured default (GATEWAY_ALERT_THRESHOLDS).
"""

from __future__ import annotations

from collections.abc import Iterable

MIN_THRESHOLD, MAX_THRESHOLD = 1, 1000
DEFAULT_THRESHOLDS = (80, 100)
# At most this many thresholds a budget: each may become an event per window.
MAX_THRESHOLDS = 20


def reached(spent: int, limit: int, threshold: int) -> bool:
    """Whether `spent` micro-credits have reached `threshold` percent of `limit`."""
    return spent > 0 and spent * 100 >= threshold * limit


def crossed(before: int, after: int, limit: int, thresholds: Iterable[int]) -> list[int]:
    """The thresholds a move of `spent` from `before` to `after` reaches for the first time."""
    return [t for t in thresholds if reached(after, limit, t) and not reached(before, limit, t)]


def newly_reached(
    spent: int, old: tuple[int, Iterable[int]] | None, new: tuple[int, Iterable[int]]
) -> tuple[list[int], list[int]]:
    """A budget changed from `old` to `new` (each (limit, thresholds); `old` None when it is new)
    while `spent` stays: (thresholds reached now and not before, thresholds not reached now).

    The first are emitted by the change (a lower limit, or a new threshold already passed); the
    second are re-armed: the next settlement that reaches one of them emits it again.
    """
    before = set() if old is None else {t for t in old[1] if reached(spent, old[0], t)}
    limit, thresholds = new
    now = [t for t in thresholds if reached(spent, limit, t)]
    return [t for t in now if t not in before], [t for t in thresholds if t not in now]


def parse(text: str | None, default: tuple[int, ...] = DEFAULT_THRESHOLDS) -> tuple[int, ...]:
    """Stored thresholds ("50,80,100", "" for none, None for `default`) as a tuple of ints."""
    if text is None:
        return default
    return tuple(int(part) for part in text.split(",") if part)


def render(thresholds: Iterable[int]) -> str:
    """Thresholds as stored: ascending, comma-separated."""
    return ",".join(str(t) for t in sorted(set(thresholds)))


def check(value: object, name: str) -> tuple[int, ...]:
    """Thresholds given by a person: a list of whole percentages (or a "50,80,100" string).

    Raises ValueError with a message naming `name`. Returned ascending, without repeats.
    """
    items: list[object]
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")] if value.strip() else []
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ValueError(f"{name} must be a list of whole percentages such as [80, 100]; got {value!r}")
    out: set[int] = set()
    for item in items:
        if isinstance(item, bool):
            number = None
        elif isinstance(item, int):
            number = item
        elif isinstance(item, str) and item.isascii() and item.isdigit():
            number = int(item)
        else:
            number = None
        if number is None or not MIN_THRESHOLD <= number <= MAX_THRESHOLD:
            raise ValueError(
                f"{name}: {item!r} is not a threshold; each must be a whole percentage of the limit "
                f"from {MIN_THRESHOLD} to {MAX_THRESHOLD}"
            )
        out.add(number)
    if len(out) > MAX_THRESHOLDS:
        raise ValueError(f"{name}: at most {MAX_THRESHOLDS} thresholds, got {len(out)}")
    return tuple(sorted(out))
