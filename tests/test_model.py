"""A model-based test: holds, charges, releases, expiries and budget changes against a simple model.

Hypothesis drives the metering functions on a real database through any sequence of steps (on
SQLite, the Python statements; on PostgreSQL, the functions of migrations 0005 and 0010 as well);
after each, the database must agree with a plain-Python model of the rules, no admission may take
a budget over its limit, and every counter must equal what the ledger and the open holds say.
Requests name an end user or none; end users' budgets are their own or made from their user's
default (contract §11), on first use or by bringing a deleted one back.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
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
from gateway.core.windows import PERIODS, window_key
from gateway.errors import BudgetExceeded, NotFound
from gateway.ops import budgeting, ledger, services
from gateway.store import migrate

from .conftest import PG_HINT, _pg_exec, _pg_template, _pg_url, counters_equal_ledger_sql, pg_admin_url

START = int(datetime(2026, 3, 30, 22, tzinfo=UTC).timestamp() * 1_000_000)  # near a day, week and month end
HOUR = 3_600_000_000
TTL = 6 * HOUR
PRICE = 100_000
CALLERS = ("k1", "k2", "k3")  # k1, k2: alice's keys; k3: bob's; both users in team eng
END_USERS = (None, "e1", "e2")  # whom a request is for: nobody said, or one of two end users
# End-user budgets the rules set: each user's default ("USER/*"), and some end users' own; in
# two periods, one that resets and one that never does (few, so the same budget is met again).
END_USER_SUBJECTS = ("alice/*", "alice/e1", "bob/*")
END_USER_PERIODS = ("daily", "total")
# How many sequences each backend runs; GATEWAY_MODEL_EXAMPLES sets both (for a longer search).
EXAMPLES = os.environ.get("GATEWAY_MODEL_EXAMPLES")

Budget = tuple[str, str, str]  # (scope, subject as the model names it, period)


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
        # End-user budgets go by "USER/END_USER", defaults by "USER/*" (which nobody's request meets).
        self.limits: dict[Budget, int] = {}
        # Every budget ever set or made: a deleted one still counts spend (it no longer limits it).
        self.budgets: set[Budget] = set()
        # End users' budgets made from their user's default, which follow it (until set as their own).
        self.from_default: set[Budget] = set()
        self.spent: dict[tuple[Any, ...], int] = defaultdict(int)
        self.held: dict[tuple[Any, ...], int] = defaultdict(int)
        self.open: dict[str, tuple[Open, list[tuple[Any, ...]]]] = {}

    def database(self) -> Engine:
        """A fresh migrated database: a copy of one migrated once (migrating takes longer than a run)."""
        self.dir = Path(tempfile.mkdtemp())
        shutil.copyfile(_sqlite_template(), self.dir / "model.db")
        engine = create_engine(f"sqlite:///{self.dir / 'model.db'}")
        event.listen(engine, "connect", lambda dbapi, _: dbapi.execute("PRAGMA foreign_keys=ON"))
        return engine

    def tx(self) -> Any:
        """One transaction, as the store would run it."""
        return self.engine.begin()

    def teardown(self) -> None:
        self.engine.dispose()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _subjects(self, caller: Caller, end_user: str | None = None) -> dict[str, str | None]:
        """The model's names: key budgets go by the caller's alias, so draws never depend on random ids."""
        alias = next(name for name, c in self.callers.items() if c is caller)
        return {
            "key": alias,
            "user": caller.user_name,
            "team": "eng",
            "end_user": None if end_user is None else f"{caller.user_name}/{end_user}",
        }

    def _real(self, scope: str, subject: str) -> str:
        return self.callers[subject].key_id if scope == "key" else subject

    def _shown(self, scope: str, stored: str) -> str:
        """The model's name of a budget's stored subject (a key id, a user id, "USER_ID/END_USER")."""
        users = {str(c.user_id): c.user_name for c in self.callers.values()}  # (a handful)
        if scope == "key":
            return next(name for name, c in self.callers.items() if c.key_id == stored)
        if scope == "end_user":
            user_id, _, end_user = stored.partition("/")
            return f"{users[user_id]}/{end_user}"
        return users[stored] if scope == "user" else "eng"

    def _applicable(self, caller: Caller, end_user: str | None = None) -> list[tuple[Any, ...]]:
        """Every budget (deleted ones too) the request counts on, with its current window."""
        moment = datetime.fromtimestamp(self.now / 1_000_000, UTC)
        names = self._subjects(caller, end_user)
        return [
            (scope, subject, period, window_key(period, moment))
            for scope, subject, period in sorted(self.budgets)
            if names[scope] == subject
        ]

    def _fits(self, applicable: list[tuple[Any, ...]], cost: int) -> bool:
        """Whether a request fits every budget that limits it; one that costs nothing always does."""
        return cost == 0 or all(self._left(a, cost) >= 0 for a in applicable if a[:3] in self.limits)

    def _left(self, counted: tuple[Any, ...], cost: int) -> int:
        """What a budget's window would have left after a request costing `cost`."""
        return self.limits[counted[:3]] - self.spent[counted] - self.held[counted] - cost

    def _check_refusal(
        self, refusal: BudgetExceeded, caller: Caller, end_user: str | None, cost: int
    ) -> None:
        """A refusal names a budget that limits the request and has no room for it."""
        details = refusal.details
        scope, subject = details["scope"], details["subject"]
        if scope == "key":
            subject = next(name for name, c in self.callers.items() if c.key_id == subject)
        named = [
            a for a in self._applicable(caller, end_user) if a[:3] == (scope, subject, details["period"])
        ]
        assert len(named) == 1 and named[0][:3] in self.limits, details
        assert self._left(named[0], cost) < 0, details
        if scope == "end_user":
            assert details["end_user"] == end_user

    # End users' budgets from defaults.

    @staticmethod
    def _default_of(budget: Budget) -> Budget:
        """The default an end user's budget is made from: their user's, of the same period."""
        _, subject, period = budget
        return ("end_user", subject.split("/")[0] + "/*", period)

    @staticmethod
    def _is_default(budget: Budget) -> bool:
        return budget[0] == "end_user" and budget[1].endswith("/*")

    def _made_from(self, default: Budget) -> list[Budget]:
        return sorted(b for b in self.from_default if self._default_of(b) == default)

    def _adopt(self, caller: Caller, end_user: str | None) -> None:
        """What admitting a request for `end_user` does first: in each period with a live default of
        their user and no live budget of theirs, they get one at the default's limit, following it
        (new, counting from now, or their deleted one back, still counting what it counted)."""
        if end_user is None:
            return
        for period in PERIODS:
            theirs: Budget = ("end_user", f"{caller.user_name}/{end_user}", period)
            default = self._default_of(theirs)
            if default in self.limits and theirs not in self.limits:
                self.limits[theirs] = self.limits[default]
                self.budgets.add(theirs)
                self.from_default.add(theirs)

    def _budgets_model(self) -> tuple[dict[Budget, int], set[Budget], set[Budget]]:
        """A copy of the model's budgets, to go back to when a transaction rolls back."""
        return dict(self.limits), set(self.budgets), set(self.from_default)

    def _set(self, scope: str, subject: str, period: str, limit: int) -> None:
        """Set a budget, in the database and the model: an end user's becomes their own; a default's
        limit goes to the budgets made from it, which live again if it had been deleted."""
        with self.tx() as conn:
            budgeting.set_budget(
                conn, scope, self._real(scope, subject), period, f"{limit / 1_000_000:.6f}", self.now
            )
        budget = (scope, subject, period)
        self.limits[budget] = limit
        self.budgets.add(budget)
        self.from_default.discard(budget)
        if self._is_default(budget):
            for made in self._made_from(budget):
                self.limits[made] = limit

    @rule(
        scope=st.sampled_from(["key", "user", "team"]),
        who=st.sampled_from(CALLERS),
        period=st.sampled_from(PERIODS),
        limit=st.integers(min_value=0, max_value=20).map(lambda n: n * PRICE // 2),
    )
    def set_budget(self, scope: str, who: str, period: str, limit: int) -> None:
        subject = self._subjects(self.callers[who])[scope]
        assert subject is not None
        self._set(scope, subject, period, limit)

    @rule(
        subject=st.sampled_from(END_USER_SUBJECTS),
        period=st.sampled_from(END_USER_PERIODS),
        limit=st.integers(min_value=0, max_value=12).map(lambda n: n * PRICE // 2),
    )
    def set_end_user_budget(self, subject: str, period: str, limit: int) -> None:
        self._set("end_user", subject, period, limit)

    @rule(data=st.data())
    @precondition(lambda self: bool(self.limits))
    def delete_budget(self, data: st.DataObject) -> None:
        self._delete(data.draw(st.sampled_from(sorted(self.limits))))

    @rule(data=st.data())
    @precondition(lambda self: bool(self._deletable_end_user_budgets()))
    def delete_end_user_budget(self, data: st.DataObject) -> None:
        """As `delete_budget`, more often on defaults and end users' own budgets, whose deletion
        does more: a default's takes the budgets made from it along; an own one's gives the end
        user the default's on their next request (in `delete_budget`, one made from a default
        is refused)."""
        self._delete(data.draw(st.sampled_from(self._deletable_end_user_budgets())))

    def _deletable_end_user_budgets(self) -> list[Budget]:
        return sorted(b for b in self.limits if b[0] == "end_user" and b not in self.from_default)

    def _delete(self, budget: Budget) -> None:
        """Delete a live budget: a default takes the budgets made from it along; one made from a
        default is not the end user's to delete (404)."""
        scope, subject, period = budget
        if budget in self.from_default:
            with pytest.raises(NotFound, match="follows the default"), self.tx() as conn:
                budgeting.delete_budget(conn, scope, subject, period, self.now)
            return
        with self.tx() as conn:
            budgeting.delete_budget(conn, scope, self._real(scope, subject), period, self.now)
        del self.limits[budget]  # set again, it starts from what it counted
        if self._is_default(budget):
            for made in self._made_from(budget):
                self.limits.pop(made, None)

    @rule(
        target=holds,
        who=st.sampled_from(CALLERS),
        end_user=st.sampled_from(END_USERS),
        messages=st.integers(1, 4),
        instance=st.sampled_from(["live", "dead"]),
    )
    def admit(self, who: str, end_user: str | None, messages: int, instance: str) -> Any:
        caller = self.callers[who]
        request_id = f"r{next(self.ids)}"
        cost = messages * PRICE
        charge = Charge(request_id, caller, "openai/gpt-oss-20b", messages, PRICE, cost, False, end_user)
        before = self._budgets_model()
        self._adopt(caller, end_user)
        applicable = self._applicable(caller, end_user)
        fits = self._fits(applicable, cost)
        try:
            with self.tx() as conn:
                admission = admit(conn, charge, instance, self.now)
        except BudgetExceeded as refusal:
            assert not fits, "refused although every budget had room"
            self._check_refusal(refusal, caller, end_user, cost)
            # `admit` raised inside the transaction: it rolled back, budgets made from defaults too.
            self.limits, self.budgets, self.from_default = before
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
                st.sampled_from(END_USERS),
                st.integers(1, 4),
                st.sampled_from(["live", "dead"]),
                st.sampled_from([PRICE, 0]),  # 0: a free model, which still has its counters
            ),
            min_size=1,
            max_size=6,
        )
    )
    def admit_together(self, requests: list[tuple[str, str | None, int, str, int]]) -> None:
        """Several admissions in one call of `admit_many`, as the store groups them: each is decided
        as if it came alone after the ones before it, whatever callers and budgets they share.
        The call returns its refusals, so the budgets it made from defaults stay."""
        calls = []
        for who, end_user, messages, instance, price in requests:
            charge = Charge(
                f"r{next(self.ids)}",
                self.callers[who],
                "openai/gpt-oss-20b",
                messages,
                price,
                messages * price,
                False,
                end_user,
            )
            calls.append((charge, instance, self.now))
        with self.tx() as conn:
            results = admit_many(conn, calls)
        assert len(results) == len(calls)
        for (charge, instance, _), (admitted, result) in zip(calls, results, strict=True):
            caller, end_user, cost = charge.caller, charge.end_user, charge.credits
            self._adopt(caller, end_user)
            applicable = self._applicable(caller, end_user)
            fits = self._fits(applicable, cost)
            assert admitted == fits, f"{charge.request_id}: admitted {admitted}, fits {fits}"
            if isinstance(result, BudgetExceeded):
                self._check_refusal(result, caller, end_user, cost)
                continue
            lefts = [self._left(a, cost) for a in applicable if a[:3] in self.limits]
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
            for scope, period, subject, window, spent, held in rows:
                key = (scope, self._shown(scope, subject), period, window)
                assert (spent, held) == (self.spent[key], self.held[key]), key
            open_holds = conn.execute(text("SELECT COUNT(*) FROM holds")).scalar_one()
            assert open_holds == len(self.open)
            budgets = conn.execute(
                text(
                    "SELECT scope, subject, period, limit_micros, deleted_at IS NULL, default_id IS NOT NULL "
                    "FROM budgets"
                )
            ).all()
        named = [
            ((scope, self._shown(scope, subject), period), *rest) for scope, subject, period, *rest in budgets
        ]
        assert {budget for budget, *_ in named} == self.budgets
        assert {budget: limit for budget, limit, live, _ in named if live} == self.limits
        assert {budget for budget, _, _, made in named if made} == self.from_default


_template: Path | None = None


def _sqlite_template() -> Path:
    """A migrated SQLite database, made once per process and removed at its exit."""
    global _template
    if _template is None:
        folder = Path(tempfile.mkdtemp())
        migrate.upgrade(f"sqlite+aiosqlite:///{folder / 'template.db'}")
        _template = folder / "template.db"
        atexit.register(shutil.rmtree, folder, True)
    return _template


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
    max_examples=int(EXAMPLES or 150),
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestMetering = MeteringMachine.TestCase

# Fewer examples: each makes a database.
PostgresMeteringMachine.TestCase.settings = settings(
    MeteringMachine.TestCase.settings, max_examples=int(EXAMPLES or 60)
)
TestMeteringPostgres = PostgresMeteringMachine.TestCase
