"""Two connections running `gateway_admit_batch` and `gateway_settle_batch` at once, over shared counters.

Hypothesis draws steps; in each, two connections (two replicas, as far as PostgreSQL can tell) each
run one batch at the same moment: admissions of random callers that share user and team counters,
or settlements of random open holds (some drawn by both). The batches lock counters in one fixed
order, so they may wait for each other but never deadlock, and each is atomic, so the outcome of a
step must be exactly that of one of the two batches run after the other: a plain-Python model runs
both orders, and the answers of the batches and every counter must match one of them (a lost
update would match neither). At the end, the counters equal the ledger and the open holds.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, create_engine, make_url, text

from gateway.core import admission, settlement
from gateway.core.metering import Admission, Caller, Charge, Settlement
from gateway.core.windows import window_keys
from gateway.errors import BudgetExceeded
from gateway.ops import budgeting, ledger, services

from .conftest import Backend, counters_equal_ledger_sql
from .test_model import HOUR, PRICE, START

pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)

# Callers (user index, key index): u0 has two keys; all three users in one team.
CALLERS = ((0, 0), (0, 1), (1, 2), (2, 3))
PERIODS = ("daily", "monthly", "total")
# What a connection's batch did: each admission's (admitted, refused on budget id, remaining,
# allocations), or each settlement's settled flag.
Answers = list[tuple[Any, ...]] | list[bool]


@dataclass
class Budget:
    id: int
    scope: str
    period: str
    limit: int


@dataclass
class Model:
    """Counters by (budget id, window): [spent, held]; open holds: request id -> (credits, allocations)."""

    counters: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    open: dict[str, tuple[int, tuple[tuple[int, int], ...]]] = field(default_factory=dict)

    def copy(self) -> Model:
        return Model({k: list(v) for k, v in self.counters.items()}, dict(self.open))


@dataclass
class World:
    """One example's team, users, keys and budgets, in a database shared by the examples."""

    callers: list[Caller]
    budgets_of: list[list[Budget]]  # each caller's budgets, in id order


def _admit(model: Model, world: World, batch: list[tuple[int, Charge, int]]) -> list[tuple[Any, ...]]:
    """The rules: in order, each request against the counters plus the holds placed before it."""
    answers: list[tuple[Any, ...]] = []
    for who, charge, at in batch:
        windows = window_keys(at)
        applied = [(b, (b.id, windows[b.period])) for b in world.budgets_of[who]]
        cost = charge.credits
        refused = next(
            (
                (b.scope, b.period)
                for b, c in applied
                if cost > 0 and sum(model.counters.get(c, [0, 0])) + cost > b.limit
            ),
            None,
        )
        if refused is not None:
            answers.append((False, refused, None, ()))
            continue
        for _, c in applied:
            model.counters.setdefault(c, [0, 0])[1] += cost
        remaining = min((b.limit - sum(model.counters[c]) for b, c in applied), default=None)
        allocations = tuple(c for _, c in applied)
        model.open[charge.request_id] = (cost, allocations)
        answers.append((True, None, remaining, allocations))
    return answers


def _settle(model: Model, batch: list[tuple[str, bool]]) -> list[bool]:
    answers: list[bool] = []
    for request_id, charged in batch:
        hold = model.open.pop(request_id, None)
        answers.append(hold is not None)
        if hold is not None:
            cost, allocations = hold
            for c in allocations:
                model.counters[c][1] -= cost
                if charged:
                    model.counters[c][0] += cost
    return answers


def _run(model: Model, world: World, op: tuple[str, Any]) -> Answers:
    kind, batch = op
    return _admit(model, world, batch) if kind == "admit" else _settle(model, batch)


def _execute(conn: Connection, world: World, op: tuple[str, Any]) -> Answers:
    """One batch, one statement: what a replica's store sends."""
    kind, batch = op
    if kind == "settle":
        calls = [
            (request_id, Settlement("charged" if c else "upstream_error", 200), START)
            for request_id, c in batch
        ]
        return settlement.settle_pg(conn, calls)
    answers: list[tuple[Any, ...]] = []
    for _, result in admission.admit_many(conn, [(charge, "replica", at) for _, charge, at in batch]):
        if isinstance(result, Admission):
            answers.append((True, None, result.remaining, result.allocations))
        else:
            assert isinstance(result, BudgetExceeded), result
            answers.append((False, (result.details["scope"], result.details["period"]), None, ()))
    return answers


def _world(conn: Connection, draw: Any | None) -> World:
    """A team of three users and four keys, with budgets drawn: the key, user and team counters
    that concurrent batches share."""
    tag = uuid.uuid4().hex[:8]
    services.create_team(conn, f"t{tag}", START)
    team_id = conn.execute(text("SELECT id FROM teams WHERE name = :n"), {"n": f"t{tag}"}).scalar_one()
    users = [services.create_user(conn, f"u{i}{tag}", f"t{tag}", START) for i in range(3)]
    keys = [services.create_key(conn, users[u]["name"], None, START) for u, _ in CALLERS]
    subjects = {"team": f"t{tag}", **{f"user{i}": u["name"] for i, u in enumerate(users)}}
    subjects.update({f"key{i}": k["id"] for i, k in enumerate(keys)})
    for name, subject in subjects.items():
        # Without `draw`: a total budget each, large enough for everything.
        periods = (
            ["total"] if draw is None else draw(st.lists(st.sampled_from(PERIODS), max_size=2, unique=True))
        )
        for period in periods:
            limit = (10_000 if draw is None else draw(st.integers(0, 12))) * PRICE
            budgeting.set_budget(
                conn, name.rstrip("0123456789"), subject, period, f"{limit / 1e6:.6f}", START
            )
    rows = conn.execute(
        text("SELECT id, scope, subject, period, limit_micros FROM budgets ORDER BY id")
    ).all()
    callers = [
        Caller(keys[k]["id"], users[u]["id"], users[u]["name"], team_id, f"t{tag}") for u, k in CALLERS
    ]
    budgets_of = [
        [
            Budget(r[0], r[1], r[3], r[4])
            for r in rows
            if (r[1], r[2]) in (("key", c.key_id), ("user", str(c.user_id)), ("team", str(team_id)))
        ]
        for c in callers
    ]
    return World(callers, budgets_of)


def _op(draw: Any, world: World, model: Model, ids: Iterator[int]) -> tuple[str, Any]:
    """A batch of admissions from any callers, or settlements of open holds (which the other
    connection may settle too). What is drawn never depends on the model: which of two orders a
    step took is up to the database, and Hypothesis must draw the same when it replays an example."""
    if draw(st.booleans()):
        picks = draw(st.lists(st.tuples(st.integers(0, 63), st.booleans()), min_size=1, max_size=8))
        held = list(model.open)
        settle: dict[str, bool] = {}
        for pick, charged in picks:
            # With nothing open, a request never admitted: its settlement changes nothing.
            settle.setdefault(held[pick % len(held)] if held else f"{0:032x}", charged)
        return ("settle", list(settle.items()))
    batch = []
    for who, messages, later in draw(
        st.lists(
            st.tuples(st.integers(0, len(CALLERS) - 1), st.integers(0, 3), st.booleans()),
            min_size=1,
            max_size=12,
        )
    ):
        batch.append(
            (who, _charge(world, who, next(ids), messages), START + (3 * HOUR if later else 0))
        )  # across a day's end
    return ("admit", batch)


def _charge(world: World, who: int, n: int, messages: int = 1) -> Charge:
    """A request of caller `who`, with an id of its own (the examples share a database)."""
    request_id = f"{n:014x}{uuid.uuid4().hex[:18]}"
    return Charge(
        request_id, world.callers[who], "openai/gpt-oss-20b", messages, PRICE, messages * PRICE, False
    )


def _counters(conn: Connection, world: World) -> dict[tuple[int, int], list[int]]:
    """This example's counters (the database is shared by the examples)."""
    rows = conn.execute(
        text("SELECT budget_id, window_start, spent_micros, held_micros FROM budget_counters")
    )
    mine = {b.id for budgets in world.budgets_of for b in budgets}
    return _used({(b, w): [s, h] for b, w, s, h in rows if b in mine})


def _used(counters: dict[tuple[int, int], list[int]]) -> dict[tuple[int, int], list[int]]:
    """Counters that are not 0 and 0 (a refused request's batch may create a counter and add nothing)."""
    return {c: v for c, v in counters.items() if v != [0, 0]}


@pytest.fixture
def engine(backend: Backend) -> Iterator[Engine]:
    engine = create_engine(make_url(backend.url).set(drivername="postgresql+psycopg2"), pool_size=4)
    yield engine
    engine.dispose()


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_two_connections_batching_shared_counters_serialize(engine: Engine, data: st.DataObject) -> None:
    ids = itertools.count(START)
    with engine.begin() as conn:
        # The examples share the database; each has budgets of its own, so its model starts empty.
        world = _world(conn, data.draw)
    model = Model()
    barrier = threading.Barrier(2)
    connections = [engine.connect().execution_options(isolation_level="AUTOCOMMIT") for _ in range(2)]

    def at_once(conn: Connection, op: tuple[str, Any]) -> Answers:
        barrier.wait(timeout=10)
        return _execute(conn, world, op)

    try:
        with ThreadPoolExecutor(2) as pool:
            for _ in range(data.draw(st.integers(1, 12))):
                ops = [_op(data.draw, world, model, ids) for _ in range(2)]
                running = [pool.submit(at_once, c, op) for c, op in zip(connections, ops, strict=True)]
                answers = [r.result(timeout=30) for r in running]  # a deadlock raises here
                with engine.connect() as conn:
                    counters = _counters(conn, world)
                serial: list[tuple[list[Answers], Model]] = []
                for first, second in ((0, 1), (1, 0)):
                    after = model.copy()
                    got: list[Answers] = [[], []]
                    got[first] = _run(after, world, ops[first])
                    got[second] = _run(after, world, ops[second])
                    serial.append((got, after))
                matches = [
                    after for got, after in serial if got == answers and _used(after.counters) == counters
                ]
                assert matches, (
                    f"neither order explains the step: {ops}\nanswers {answers}\ncounters {counters}"
                )
                model = matches[0]
    finally:
        for conn in connections:
            conn.close()
    with engine.begin() as conn:
        for row in conn.execute(text(counters_equal_ledger_sql())).all():
            assert (row[2], row[3]) == (row[4], row[5]), f"counter differs from the ledger: {row}"
        verified = ledger.verify(conn)
        assert verified["ok"], verified["differences"]


def test_settlements_of_the_same_holds_in_opposite_orders_do_not_deadlock(engine: Engine) -> None:
    """A sweep of another replica can take holds still being settled (its heartbeat stalled past
    the TTL): two statements then delete the same holds, each in the order it was given. Unless the
    holds are taken in one order, each waits for a hold the other has: a deadlock (PostgreSQL
    breaks it by failing one, and the store retries)."""
    with engine.begin() as conn:
        world = _world(conn, None)
    ids = itertools.count(START)
    barrier = threading.Barrier(2)
    connections = [engine.connect().execution_options(isolation_level="AUTOCOMMIT") for _ in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:
            for _ in range(60):
                batch = [
                    (who, _charge(world, who, next(ids)), START)
                    for who in range(len(CALLERS))
                    for _ in range(5)
                ]
                assert all(a[0] for a in _execute(connections[0], world, ("admit", batch)))
                held = [charge.request_id for _, charge, _ in batch]
                ops = [
                    ("settle", [(r, True) for r in held]),
                    ("settle", [(r, False) for r in reversed(held)]),
                ]

                def at_once(conn: Connection, op: tuple[str, Any]) -> Answers:
                    barrier.wait(timeout=10)
                    return _execute(conn, world, op)

                running = [pool.submit(at_once, c, op) for c, op in zip(connections, ops, strict=True)]
                first, second = [r.result(timeout=30) for r in running]
                assert [a or b for a, b in zip(first, second, strict=True)] == [True] * len(held)
                assert not any(a and b for a, b in zip(first, second, strict=True))
    finally:
        for conn in connections:
            conn.close()
