"""A model-based test: holds, charges, releases, expiries and budget changes against a simple model.

Hypothesis drives the metering functions on a real database through any sequence of steps (on
SQLite, the Python statements; on PostgreSQL, the functions of migration 0005 as well);
after each, the database must agree with a plain-Python model of the rules, no admission may take
a budget over its limit, and every counter must equal what the ledger and the open holds say.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule
from sqlalchemy import Engine, create_engine, event, make_url, text

from gateway.core import expiry
from gateway.core.admission import admit, admit_many
from gateway.core.metering import Admission, Caller, Charge, Settlement
from gateway.core.settlement import settle, settle_many
from gateway.core.windows import window_key
from gateway.errors import BudgetExceeded
from gateway.ops import ledger, services
from gateway.store import migrate

from .conftest import PG_HINT, _pg_exec, _pg_template, _pg_url, counters_equal_ledger_sql, pg_admin_url

START = int(datetime(2026, 3, 30, 22, tzinfo=UTC).timestamp() * 1_000_000)  # near a day, week and month end
HOUR = 3_600_000_000
TTL = 6 * HOUR
PRICE = 100_000
CALLERS = ("k1", "k2", "k3")  # k1, k2: alice's keys; k3: bob's; both users in team eng


@dataclass
class Open:
    """A hold in the model."""

    admission: Admission
    instance: str


class MeteringMachine(RuleBasedStateMachine):
    holds = Bundle("holds")

    def __init__(self) -> None:
        super().__init__()
        self.engine = self.database()
        self.now = START
        self.ids = itertools.count()
        with self.tx() as conn:
            services.create_team(conn, "eng", self.now)
            alice = services.create_user(conn, "alice", "eng", self.now)
            bob = services.create_user(conn, "bob", "eng", self.now)
            keys = [services.create_key(conn, u, None, self.now) for u in ("alice", "alice", "bob")]
        self.callers = {
            name: Caller(key["id"], user["id"], user["name"], 1, "eng")
            for name, key, user in zip(CALLERS, keys, (alice, alice, bob), strict=True)
        }
        # The model: limits by (scope, subject, period); usage by (scope, subject, period, window).
        self.limits: dict[tuple[str, str, str], int] = {}
        # Every budget ever set: a deleted one still counts spend (it no longer limits it).
        self.budgets: set[tuple[str, str, str]] = set()
        self.spent: dict[tuple[Any, ...], int] = defaultdict(int)
        self.held: dict[tuple[Any, ...], int] = defaultdict(int)
        self.open: dict[str, tuple[Open, list[tuple[Any, ...]]]] = {}

    def database(self) -> Engine:
        """A fresh migrated database."""
        self.dir = Path(tempfile.mkdtemp())
        url = f"sqlite+aiosqlite:///{self.dir / 'model.db'}"
        migrate.upgrade(url)
        engine = create_engine(f"sqlite:///{self.dir / 'model.db'}")
        event.listen(engine, "connect", lambda dbapi, _: dbapi.execute("PRAGMA foreign_keys=ON"))
        return engine

    def tx(self) -> Any:
        """One transaction, as the store would run it."""
        return self.engine.begin()

    def teardown(self) -> None:
        self.engine.dispose()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _subjects(self, caller: Caller) -> dict[str, str]:
        """The model's names: key budgets go by the caller's alias, so draws never depend on random ids."""
        alias = next(name for name, c in self.callers.items() if c is caller)
        return {"key": alias, "user": caller.user_name, "team": "eng"}

    def _real(self, scope: str, subject: str) -> str:
        return self.callers[subject].key_id if scope == "key" else subject

    def _applicable(self, caller: Caller) -> list[tuple[Any, ...]]:
        moment = datetime.fromtimestamp(self.now / 1_000_000, UTC)
        out = []
        for scope, subject, period in sorted(self.budgets):
            if self._subjects(caller)[scope] == subject:
                out.append((scope, subject, period, window_key(period, moment)))
        return out

    def _fits(self, applicable: list[tuple[Any, ...]], cost: int) -> bool:
        """Whether a request fits every budget that limits it; one that costs nothing always does."""
        return cost == 0 or all(
            self.spent[a] + self.held[a] + cost <= self.limits[a[:3]]
            for a in applicable
            if a[:3] in self.limits
        )

    @rule(
        scope=st.sampled_from(["key", "user", "team"]),
        who=st.sampled_from(CALLERS),
        period=st.sampled_from(["daily", "weekly", "monthly", "total"]),
        limit=st.integers(min_value=0, max_value=20).map(lambda n: n * PRICE // 2),
    )
    def set_budget(self, scope: str, who: str, period: str, limit: int) -> None:
        subject = self._subjects(self.callers[who])[scope]
        with self.tx() as conn:
            services.set_budget(
                conn, scope, self._real(scope, subject), period, f"{limit / 1_000_000:.6f}", self.now
            )
        self.limits[(scope, subject, period)] = limit
        self.budgets.add((scope, subject, period))

    @rule(data=st.data())
    @precondition(lambda self: bool(self.limits))
    def delete_budget(self, data: st.DataObject) -> None:
        scope, subject, period = data.draw(st.sampled_from(sorted(self.limits)))
        with self.tx() as conn:
            services.delete_budget(conn, scope, self._real(scope, subject), period)
        del self.limits[(scope, subject, period)]  # set again, it starts from what it counted

    @rule(
        target=holds,
        who=st.sampled_from(CALLERS),
        messages=st.integers(1, 4),
        instance=st.sampled_from(["live", "dead"]),
    )
    def admit(self, who: str, messages: int, instance: str) -> Any:
        caller = self.callers[who]
        request_id = f"r{next(self.ids)}"
        cost = messages * PRICE
        charge = Charge(request_id, caller, "openai/gpt-oss-20b", messages, PRICE, cost, False)
        applicable = self._applicable(caller)
        fits = self._fits(applicable, cost)
        try:
            with self.tx() as conn:
                admission = admit(conn, charge, instance, self.now)
        except BudgetExceeded:
            assert not fits, "refused although every budget had room"
            return None
        assert fits, "admitted although a budget had no room"
        for a in applicable:
            self.held[a] += cost
            assert cost == 0 or a[:3] not in self.limits or self.spent[a] + self.held[a] <= self.limits[a[:3]]
        self.open[request_id] = (Open(admission, instance), applicable)
        return request_id

    @rule(request_id=consumes(holds), charged=st.booleans())
    def settle(self, request_id: str | None, charged: bool) -> None:
        if request_id is None or request_id not in self.open:
            return
        hold, applicable = self.open[request_id]
        settlement = Settlement("charged", 200) if charged else Settlement("upstream_error", 500)
        with self.tx() as conn:
            assert settle(conn, hold.admission, settlement, self.now)
        self._settled(request_id, charged)

    def _settled(self, request_id: str, charged: bool) -> None:
        """The model after a settlement of an open hold."""
        hold, applicable = self.open.pop(request_id)
        cost = hold.admission.charge.credits
        for a in applicable:
            self.held[a] -= cost
            if charged:
                self.spent[a] += cost

    @rule(
        requests=st.lists(
            st.tuples(
                st.sampled_from(CALLERS),
                st.integers(1, 4),
                st.sampled_from(["live", "dead"]),
                st.sampled_from([PRICE, 0]),  # 0: a free model, which still has its counters
            ),
            min_size=1,
            max_size=6,
        )
    )
    def admit_together(self, requests: list[tuple[str, int, str, int]]) -> None:
        """Several admissions in one call of `admit_many`, as the store groups them: each is decided
        as if it came alone after the ones before it, whatever callers and budgets they share."""
        calls = []
        for who, messages, instance, price in requests:
            charge = Charge(
                f"r{next(self.ids)}",
                self.callers[who],
                "openai/gpt-oss-20b",
                messages,
                price,
                messages * price,
                False,
            )
            calls.append((charge, instance, self.now))
        with self.tx() as conn:
            results = admit_many(conn, calls)
        assert len(results) == len(calls)
        for (charge, instance, _), (admitted, result) in zip(calls, results, strict=True):
            applicable = self._applicable(charge.caller)
            cost = charge.credits
            fits = self._fits(applicable, cost)
            assert admitted == fits, f"{charge.request_id}: admitted {admitted}, fits {fits}"
            if isinstance(result, BudgetExceeded):
                continue
            lefts = [
                self.limits[a[:3]] - self.spent[a] - self.held[a] - cost
                for a in applicable
                if a[:3] in self.limits
            ]
            assert result.remaining == (min(lefts) if lefts else None)
            for a in applicable:
                self.held[a] += cost
            self.open[charge.request_id] = (Open(result, instance), applicable)

    @rule(data=st.data(), charged=st.booleans())
    @precondition(lambda self: bool(self.open))
    def settle_together(self, data: st.DataObject, charged: bool) -> None:
        """Several settlements in one call of `settle_many`, as the store groups them."""
        chosen = data.draw(st.lists(st.sampled_from(sorted(self.open)), min_size=1, max_size=5, unique=True))
        settlement = Settlement("charged", 200) if charged else Settlement("upstream_error", 500)
        calls = [(self.open[request_id][0].admission, settlement, self.now) for request_id in chosen]
        with self.tx() as conn:
            assert settle_many(conn, calls) == [(True, True)] * len(calls)
        for request_id in chosen:
            self._settled(request_id, charged)

    @rule(hours=st.integers(1, 30))
    def advance_clock(self, hours: int) -> None:
        self.now += hours * HOUR

    @rule()
    def sweep(self) -> None:
        """A live process beats; holds of the dead instance older than the TTL are released."""
        with self.tx() as conn:
            expiry.heartbeat(conn, "live", self.now, 0)
            released = expiry.expire_holds(conn, self.now - TTL, self.now)
        expected = [
            rid
            for rid, (hold, _) in self.open.items()
            if hold.instance == "dead" and hold.admission.admitted_at < self.now - TTL
        ]
        assert released == len(expected)
        for rid in expected:
            hold, applicable = self.open.pop(rid)
            for a in applicable:
                self.held[a] -= hold.admission.charge.credits

    @invariant()
    def database_agrees_with_model(self) -> None:
        with self.tx() as conn:
            for row in conn.execute(text(counters_equal_ledger_sql())).all():
                assert (row[2], row[3]) == (row[4], row[5]), f"counter differs from the ledger: {row}"
            # What `gateway ledger verify` checks, which also finds allocations without a counter.
            verified = ledger.verify(conn)
            assert verified["ok"], verified["differences"]
            rows = conn.execute(
                text(
                    "SELECT b.scope, b.period, b.subject, c.window_start, c.spent_micros, c.held_micros "
                    "FROM budget_counters c JOIN budgets b ON b.id = c.budget_id"
                )
            ).all()
            users = {str(c.user_id): c.user_name for c in self.callers.values()}
            aliases = {c.key_id: name for name, c in self.callers.items()}
            for scope, period, subject, window, spent, held in rows:
                shown = {"key": aliases.get(subject), "user": users.get(subject), "team": "eng"}[scope]
                key = (scope, shown, period, window)
                assert (spent, held) == (self.spent[key], self.held[key]), key
            open_holds = conn.execute(text("SELECT COUNT(*) FROM holds")).scalar_one()
            assert open_holds == len(self.open)


class PostgresMeteringMachine(MeteringMachine):
    """The same machine on PostgreSQL, through a synchronous driver (the units are plain functions)."""

    def database(self) -> Engine:
        admin_url = pg_admin_url()
        if admin_url is None:
            pytest.skip(PG_HINT)
        template = _pg_template(admin_url)
        self.name = f"gw_model_{uuid.uuid4().hex[:12]}"
        self.admin_url = admin_url
        asyncio.run(_pg_exec(admin_url, [f'CREATE DATABASE "{self.name}" TEMPLATE "{template}"']))
        url = make_url(_pg_url(admin_url, self.name)).set(drivername="postgresql+psycopg2")
        return create_engine(url)

    def teardown(self) -> None:
        self.engine.dispose()
        asyncio.run(_pg_exec(self.admin_url, [f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)']))


MeteringMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestMetering = MeteringMachine.TestCase

# Fewer examples: each makes a database.
PostgresMeteringMachine.TestCase.settings = settings(MeteringMachine.TestCase.settings, max_examples=60)
TestMeteringPostgres = PostgresMeteringMachine.TestCase
