"""Metrics agree with the ledger label by label, and the budget gauges with the database.

Counters are checked after a scripted mix of traffic (charged plain and streamed, refused before
admission, failed upstream); gauges after refreshes triggered by settlements, by the interval,
and by changes this process never saw (another replica's traffic, an admin's direct change).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from gateway.ops import budgeting, gauges
from gateway.ops.metrics import OVERHEAD_BUCKETS, FastCounter, FastGauge, FastHistogram, Metrics
from gateway.store import Store
from gateway.web.app import create_app
from gateway.web.state import GAUGES

from .conftest import World

FLASH, LITE, PRO, OSS20, OSS120 = (
    "google/gemini-2.5-flash",
    "google/gemini-2.5-flash-lite",
    "google/gemini-2.5-pro",
    "openai/gpt-oss-20b",
    "openai/gpt-oss-120b",
)
BUDGET_METRICS = {
    "limit": "gateway_budget_limit_credits",
    "spent": "gateway_budget_spent_credits",
    "remaining": "gateway_budget_remaining_credits",
}
Labels = tuple[str, ...]


# ------------------------------------------------------------------ reading the registry


def counted(metric: Counter, *labels: str) -> dict[Labels, float]:
    """A counter's value per label set (label values in the order given)."""
    return {
        tuple(s.labels[name] for name in labels): s.value
        for family in metric.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }


def observed(metric: Histogram, *labels: str) -> dict[Labels, float]:
    """A histogram's observation count per label set."""
    return {
        tuple(s.labels[name] for name in labels): s.value
        for family in metric.collect()
        for s in family.samples
        if s.name.endswith("_count")
    }


def gauged(metric: Gauge) -> dict[Labels, float]:
    """A budget gauge's value per (scope, subject, period)."""
    return {
        (s.labels["scope"], s.labels["subject"], s.labels["period"]): s.value
        for family in metric.collect()
        for s in family.samples
    }


def budget_gauges(metrics: Metrics) -> dict[str, dict[Labels, float]]:
    return {
        "limit": gauged(metrics.budget_limit),
        "spent": gauged(metrics.budget_spent),
        "remaining": gauged(metrics.budget_remaining),
    }


def scraped_budget_gauges(exposition: str) -> dict[str, dict[Labels, float]]:
    """The budget gauges as a scrape of GET /metrics sees them."""
    out: dict[str, dict[Labels, float]] = {field: {} for field in BUDGET_METRICS}
    names = {name: field for field, name in BUDGET_METRICS.items()}
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name in names:
                out[names[s.name]][(s.labels["scope"], s.labels["subject"], s.labels["period"])] = s.value
    return out


def from_database(budgets: list[dict[str, Any]]) -> dict[str, dict[Labels, float]]:
    """What the gauges should say, from the admin API's budget list."""
    return {
        field: {(b["scope"], b["subject"], b["period"]): float(b[field]) for b in budgets}
        for field in BUDGET_METRICS
    }


def approx(values: dict[str, dict[Labels, float]]) -> Any:
    return {field: pytest.approx(series, abs=1e-9) for field, series in values.items()}


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    """Poll `check` until it holds; the seconds it took, or fail after `within`."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within:
            pytest.fail(f"{what} not within {within}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


# ------------------------------------------------------------------ traffic


async def chat(
    w: World, key: str | None, model: str, contents: list[str], *, stream: bool = False, status: int = 200
) -> None:
    """One chat request; asserts the answer's status and reads the whole answer."""
    body = {"model": model, "messages": [{"role": "user", "content": c} for c in contents], "stream": stream}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    resp = await w.client.post("/api/v1/chat", json=body, headers=headers)
    text = await resp.text()
    assert resp.status == status, text


async def scripted_traffic(w: World) -> Tally[Labels]:
    """A mix of every kind of request; returns the refusals sent, by (model, outcome)."""
    alice, bob, carol = [(await w.key(name))["key"] for name in ("alice", "bob", "carol")]
    await w.budget("team", "eng", "100")
    await w.budget("user", "bob", "2")  # two flash messages, then 402
    await w.budget("user", "carol", "50", period="total")

    await chat(w, alice, OSS20, ["a", "b"])
    await chat(w, alice, OSS20, ["a"], stream=True)
    await chat(w, alice, LITE, ["a", "b", "c"], stream=True)
    await chat(w, carol, PRO, ["a"])
    await chat(w, carol, OSS20, ["a", "b", "c", "d"], stream=True)
    await asyncio.gather(*(chat(w, carol, OSS120, ["x"] * (i + 1)) for i in range(8)))
    await asyncio.gather(*(chat(w, alice, LITE, ["y"] * (i + 1), stream=i % 2 == 0) for i in range(6)))
    # Upstream failures: relayed, not charged, in the ledger.
    await chat(w, alice, OSS120, ["hi", "fake:500"], status=500)
    await chat(w, alice, OSS120, ["fake:500"], stream=True, status=500)
    await chat(w, carol, OSS20, ["fake:429"], status=429)
    await chat(w, alice, OSS20, ["fake:reset"], status=502)
    await chat(w, alice, PRO, ["fake:slow:2"], status=504)
    # Bob: two charged, then refused for his budget.
    await chat(w, bob, FLASH, ["a"])
    await chat(w, bob, FLASH, ["a"], stream=True)
    await chat(w, bob, FLASH, ["a"], status=402)
    await chat(w, bob, FLASH, ["a"], stream=True, status=402)
    await chat(w, bob, FLASH, ["a", "b"], status=402)
    # Refused before admission, so never in the ledger.
    await chat(w, None, OSS20, ["a"], status=401)
    await chat(w, "gwk_not-a-key", OSS20, ["a"], status=401)
    await chat(w, alice, OSS20, [], status=400)
    await chat(w, alice, "nobody/none", ["a"], status=400)
    await chat(w, alice, OSS20, ["z" * 5000], status=413)
    return Tally(
        {
            (FLASH, "budget_exceeded"): 3,
            ("", "unauthorized"): 2,
            ("", "invalid_request"): 1,
            ("", "unknown_model"): 1,
            ("", "request_too_large"): 1,
        }
    )


# ------------------------------------------------------------------ counters


async def test_counters_equal_the_ledger(world: World) -> None:
    # Well under fake:slow:2, and far over any other answer even on a loaded 2-core CI machine (a
    # normal first request once took over 0.5 s there).
    await world.reconfigure(upstream_timeout_seconds=1.0, max_body_bytes=4096)
    refusals = await scripted_traffic(world)
    m = world.metrics

    outcomes = await world.sql("SELECT model, outcome, COUNT(*) FROM ledger GROUP BY model, outcome")
    ledger = Tally({(model, outcome): n for model, outcome, n in outcomes})
    assert {outcome for _, outcome in ledger} == {
        "charged",
        "upstream_error",
        "upstream_unavailable",
        "upstream_timeout",
    }
    assert counted(m.requests, "model", "outcome") == ledger + refusals

    charged = await world.sql(
        "SELECT l.model, COALESCE(t.name, ''), SUM(l.credits_micros), SUM(l.message_count) "
        "FROM ledger l LEFT JOIN teams t ON t.id = l.team_id WHERE l.outcome = 'charged' "
        "GROUP BY l.model, COALESCE(t.name, '')"
    )
    assert {team for _, team, *_ in charged} == {"eng", ""}
    credits = {(model, team): int(micros) / 1_000_000 for model, team, micros, _ in charged}
    assert counted(m.credits_charged, "model", "team") == pytest.approx(credits, rel=1e-12)
    messages = {(model, team): float(n) for model, team, _, n in charged}
    assert counted(m.messages_charged, "model", "team") == messages

    tokens = await world.sql(
        "SELECT model, SUM(prompt_tokens), SUM(completion_tokens) FROM ledger "
        "WHERE outcome = 'charged' GROUP BY model"
    )
    expected_tokens = {(model, "prompt"): float(p) for model, p, _ in tokens} | {
        (model, "completion"): float(c) for model, _, c in tokens
    }
    assert all(v > 0 for v in expected_tokens.values())
    assert counted(m.tokens, "model", "kind") == expected_tokens

    durations = await world.sql("SELECT model, stream, COUNT(*) FROM ledger GROUP BY model, stream")
    expected_durations = {(model, "true" if stream else "false"): float(n) for model, stream, n in durations}
    assert observed(m.request_duration, "model", "stream") == expected_durations
    answered = await world.sql(
        "SELECT model, COUNT(*) FROM ledger WHERE upstream_status IS NOT NULL GROUP BY model"
    )
    assert observed(m.upstream_first_byte, "model") == {(model,): float(n) for model, n in answered}
    assert m.registry.get_sample_value("gateway_overhead_seconds_count") == sum(ledger.values())
    assert m.registry.get_sample_value("gateway_inflight_requests") == 0

    await world.client.app[GAUGES].refresh(world.store)
    assert budget_gauges(m) == approx(from_database(await world.admin(budgeting.list_budgets)))


# ------------------------------------------------------------------ budget gauges


async def test_budget_gauges_equal_the_database(world: World) -> None:
    key = await world.key("alice")
    await world.budget("team", "eng", "10")
    await world.budget("user", "alice", "3", period="weekly")
    await world.budget("user", "carol", "0", period="monthly")
    await world.budget("key", key["id"], "2.5", period="total")
    for n in (1, 2, 3):
        await chat(world, key["key"], LITE, ["m"] * n)
    gauge_set = world.client.app[GAUGES]
    await gauge_set.refresh(world.store)

    budgets = await world.admin(budgeting.list_budgets)
    assert len(budgets) == 4
    assert budget_gauges(world.metrics) == approx(from_database(budgets))
    assert gauged(world.metrics.budget_spent)[("key", key["id"], "total")] == pytest.approx(0.9)
    assert gauged(world.metrics.budget_remaining)[("user", "alice", "weekly")] == pytest.approx(2.1)

    await world.admin(budgeting.delete_budget, "user", "alice", "weekly")
    await world.budget("team", "eng", "12")
    await gauge_set.refresh(world.store)
    budgets = await world.admin(budgeting.list_budgets)
    assert len(budgets) == 3
    shown = budget_gauges(world.metrics)
    assert shown == approx(from_database(budgets))
    for series in shown.values():
        assert ("user", "alice", "weekly") not in series
    scrape = await (await world.client.get("/metrics")).text()
    assert 'subject="alice"' not in scrape
    assert scraped_budget_gauges(scrape) == approx(from_database(budgets))


async def test_budget_gauges_are_filled_at_start_up(world: World) -> None:
    await world.budget("team", "eng", "7")
    await world.budget("user", "carol", "1", period="total")
    metrics = Metrics()
    await world.make_client(create_app(world.settings, store=world.store, metrics=metrics))

    async def shown() -> bool:
        return len(gauged(metrics.budget_limit)) == 2

    await eventually(shown, 2.0, "budget gauges after start-up")
    assert budget_gauges(metrics) == approx(from_database(await world.admin(budgeting.list_budgets)))


class CountingStore:
    """The world's store, counting the budget gauges' reads."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.dialect = store.dialect
        self.reads = 0

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if fn is gauges.budgets_now:
            self.reads += 1
        return await self.store.run(fn, *args)

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        if fn is gauges.budgets_now:
            self.reads += 1
        return await self.store.read(fn, *args)

    async def ping(self) -> None:
        await self.store.ping()

    async def close(self) -> None:
        """The world owns the store."""


async def test_settlements_refresh_the_gauges_once_per_burst(world: World) -> None:
    alice = (await world.key("alice"))["key"]
    carol = (await world.key("carol"))["key"]
    await world.budget("user", "alice", "100")
    store = CountingStore(world.store)
    metrics = Metrics()
    app = create_app(world.settings, store=store, metrics=metrics)
    app[GAUGES].interval = 3600  # only settlements can trigger a refresh in this test
    world.client = await world.make_client(app)

    async def started() -> bool:
        return store.reads == 1

    await eventually(started, 2.0, "the first refresh")

    # A request on no budget changes no gauge: no refresh.
    await chat(world, carol, OSS20, ["a"])
    await asyncio.sleep(gauges.DEBOUNCE_SECONDS * 3)
    assert store.reads == 1

    await asyncio.gather(*(chat(world, alice, FLASH, ["m"]) for _ in range(20)))

    async def spent() -> bool:
        return gauged(metrics.budget_spent).get(("user", "alice", "daily")) == pytest.approx(20)

    await eventually(spent, gauges.DEBOUNCE_SECONDS + 1.5, "the spend of a burst")
    await asyncio.sleep(gauges.DEBOUNCE_SECONDS * 3)
    assert 2 <= store.reads <= 3, "twenty settlements should cost one or two reads, not twenty"
    assert gauged(metrics.budget_remaining)[("user", "alice", "daily")] == pytest.approx(80)


async def test_changes_made_elsewhere_show_within_the_interval(world: World) -> None:
    """A replica that served none of a budget's traffic, nor saw its change, still shows it."""
    alice = (await world.key("alice"))["key"]
    await world.budget("user", "alice", "10")
    await world.budget("user", "bob", "5", period="weekly")
    await world.client.app[GAUGES].refresh(world.store)
    quiet = world.client  # this replica serves nothing from here on
    world.client = await world.make_client(create_app(world.settings, store=world.store, metrics=Metrics()))

    await chat(world, alice, PRO, ["a", "b"])  # 6 credits, on the other replica
    # An admin's changes, straight on the database.
    await world.budget("user", "alice", "12")
    await world.budget("team", "eng", "40", period="monthly")
    await world.admin(budgeting.delete_budget, "user", "bob", "weekly")
    expected = approx(from_database(await world.admin(budgeting.list_budgets)))
    assert expected["spent"] == {("user", "alice", "daily"): 6, ("team", "eng", "monthly"): 0}
    assert expected["remaining"] == {("user", "alice", "daily"): 6, ("team", "eng", "monthly"): 40}

    async def caught_up() -> bool:
        text = await (await quiet.get("/metrics")).text()
        return bool(scraped_budget_gauges(text) == expected)

    await eventually(caught_up, gauges.REFRESH_INTERVAL_SECONDS + 2, "the quiet replica's gauges")


# ------------------------------------------------------------------ the metrics' own implementation


def _samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    """Every sample but the `_created` ones (a time)."""
    out = []
    for family in registry.collect():
        for s in family.samples:
            if not s.name.endswith("_created"):
                out.append((s.name, s.labels, s.value))
    return out


@given(
    observations=st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.one_of(st.sampled_from([0.0, *OVERHEAD_BUCKETS, 2.0]), st.floats(0, 5, allow_nan=False)),
        ),
        max_size=30,
    )
)
def test_the_fast_metrics_expose_what_prometheus_clients_would(observations: list[tuple[str, float]]) -> None:
    """FastCounter, FastHistogram and FastGauge against prometheus_client's own, fed the same:
    the same samples, bucket by bucket (a value on a bound counts in that bound's bucket)."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast_count = FastCounter("x_total", "doc", ["model"], ours)
    fast_seconds = FastHistogram("y_seconds", "doc", ["model"], OVERHEAD_BUCKETS, ours)
    fast_plain = FastHistogram("z_seconds", "doc", [], OVERHEAD_BUCKETS, ours)
    fast_gauge = FastGauge("w", "doc", ours)
    count = Counter("x_total", "doc", ["model"], registry=theirs)
    seconds = Histogram("y_seconds", "doc", ["model"], buckets=OVERHEAD_BUCKETS, registry=theirs)
    plain = Histogram("z_seconds", "doc", buckets=OVERHEAD_BUCKETS, registry=theirs)
    gauge = Gauge("w", "doc", registry=theirs)
    for model, value in observations:
        fast_count.labels(model).inc(value)
        count.labels(model).inc(value)
        fast_seconds.labels(model=model).observe(value)
        seconds.labels(model=model).observe(value)
        fast_plain.observe(value)
        plain.observe(value)
        fast_gauge.inc()
        gauge.inc()
    fast_gauge.dec()
    gauge.dec()
    assert _samples(ours) == _samples(theirs)
    assert [f.name for f in ours.collect()] == [f.name for f in theirs.collect()]


def test_a_fast_counter_refuses_to_go_down() -> None:
    counter = FastCounter("x_total", "doc", ["model"], CollectorRegistry())
    with pytest.raises(ValueError):
        counter.labels("m").inc(-1)
    assert counter.labels("m").value == 0
