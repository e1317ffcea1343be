"""One request of a batch refused or failing: every other request of that batch gets its own answer.

The stores send the admissions (and the settlements) of every caller that arrive together to the
database as one call of `admit_many` (`settle_many`): on PostgreSQL one statement. A refusal is one
request's answer; an error the database raises for one request's values fails the batch, which is
then run request by request, so that only that request fails. On both backends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import Connection

from gateway.core.admission import admit
from gateway.core.metering import Admission, Caller, Charge, Settlement, new_request_id, now_us
from gateway.core.settlement import settle
from gateway.errors import BudgetExceeded, LedgerUnavailable
from gateway.ops import ledger
from gateway.store import units

from .conftest import World, assert_counters_match_ledger
from .test_money_defects import _caller_of

PRICE = 100_000  # 0.1 credits a message


def _charge(caller: Caller, request_id: str | None = None) -> Charge:
    return Charge(request_id or new_request_id(), caller, "openai/gpt-oss-20b", 1, PRICE, PRICE, False)


def _record_groups(monkeypatch: pytest.MonkeyPatch, unit: Any) -> list[list[Any]]:
    """The calls of every group of `unit` the store sends to the database from now on."""
    groups: list[list[Any]] = []
    many = units.GROUPS[unit]

    def recorded(conn: Connection, calls: Sequence[Any]) -> Any:
        groups.append(list(calls))
        return many(conn, calls)

    monkeypatch.setitem(units.GROUPS, unit, recorded)
    return groups


async def _callers(world: World) -> tuple[Caller, Caller]:
    alice, bob = await world.key("alice"), await world.key("bob")
    return await world.admin(_caller_of, alice["id"]), await world.admin(_caller_of, bob["id"])


async def test_a_refusal_in_a_batch_of_many_callers_refuses_only_its_own(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alice's own budget is spent; bob's requests beside hers in one batch are admitted, and the
    team counter they share holds exactly bob's."""
    alice, bob = await _callers(world)
    await world.budget("user", "alice", "0.1")
    await world.budget("team", "eng", "1")
    first = await world.admin(admit, _charge(alice), "i", now_us())
    assert await world.admin(settle, first, Settlement("charged", 200), now_us())
    groups = _record_groups(monkeypatch, admit)
    who = [bob, alice, bob, bob, alice, bob]
    results = await asyncio.gather(
        *(world.store.run(admit, _charge(c), "i", now_us()) for c in who), return_exceptions=True
    )
    for caller, result in zip(who, results, strict=True):
        if caller is alice:
            assert isinstance(result, BudgetExceeded), result
            assert (result.details["scope"], result.details["remaining"]) == ("user", 0)
        else:
            assert isinstance(result, Admission), result
    # Refused beside admitted ones, in one group (PostgreSQL starts a lone first call at once).
    assert any(len({c[0].caller.user_id for c in group}) == 2 for group in groups), groups
    assert [r.remaining for r in results if isinstance(r, Admission)] == [800_000, 700_000, 600_000, 500_000]
    held = await world.sql(
        "SELECT b.scope, c.spent_micros, c.held_micros FROM budget_counters c "
        "JOIN budgets b ON b.id = c.budget_id ORDER BY b.scope"
    )
    assert held == [("team", PRICE, 4 * PRICE), ("user", PRICE, 0)]
    await assert_counters_match_ledger(world)


async def test_an_admission_the_database_refuses_fails_alone(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request id already held (the holds' primary key refuses it) in a batch of admissions: that
    admission fails with the database's error, not an outage; the others are admitted, the hold
    already there is left as it was, and the books balance."""
    alice, bob = await _callers(world)
    await world.budget("team", "eng", "1")
    held = await world.admin(admit, _charge(alice), "i", now_us())
    groups = _record_groups(monkeypatch, admit)
    charges = [_charge(bob), _charge(alice), _charge(bob, held.charge.request_id), _charge(alice)]
    results = await asyncio.gather(
        *(world.store.run(admit, c, "i", now_us()) for c in charges), return_exceptions=True
    )
    assert [isinstance(r, Admission) for r in results] == [True, True, False, True], results
    assert not isinstance(results[2], (LedgerUnavailable, BudgetExceeded)), results[2]
    assert "request_id" in str(results[2]) or "UNIQUE" in str(results[2]).upper(), results[2]
    assert any(len(group) > 1 and charges[2] in [c[0] for c in group] for group in groups), groups
    holds = await world.sql("SELECT request_id, key_id FROM holds ORDER BY request_id")
    assert sorted(holds) == sorted(
        [(held.charge.request_id, alice.key_id)]
        + [(r.charge.request_id, r.charge.caller.key_id) for r in results if isinstance(r, Admission)]
    )
    assert await world.sql("SELECT held_micros FROM budget_counters") == [(4 * PRICE,)]
    await assert_counters_match_ledger(world)
    admitted = [held, *(r for r in results if isinstance(r, Admission))]
    settled = await asyncio.gather(
        *(world.store.run(settle, a, Settlement("charged", 200), now_us()) for a in admitted)
    )
    assert settled == [True] * 4
    assert await world.sql("SELECT spent_micros, held_micros FROM budget_counters") == [(4 * PRICE, 0)]
    assert (await world.admin(ledger.verify))["ok"]


async def test_a_settlement_the_database_refuses_fails_alone(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Token counts no column takes, in a batch of settlements: that settlement fails (its hold
    stays, to be settled again or expired), the others are charged."""
    alice, bob = await _callers(world)
    await world.budget("team", "eng", "1")
    admitted = [await world.admin(admit, _charge(c), "i", now_us()) for c in (alice, bob, alice, bob)]
    groups = _record_groups(monkeypatch, settle)
    # Past a 64-bit integer: SQLite cannot bind it, PostgreSQL's integer column refuses it.
    poison = Settlement("charged", 200, prompt_tokens=2**63)
    results = await asyncio.gather(
        *(
            world.store.run(settle, a, poison if i == 1 else Settlement("charged", 200), now_us())
            for i, a in enumerate(admitted)
        ),
        return_exceptions=True,
    )
    assert results[0] is True and results[2:] == [True, True], results
    assert isinstance(results[1], Exception) and not isinstance(results[1], LedgerUnavailable), results[1]
    assert any(len(group) > 1 for group in groups), groups
    assert await world.sql("SELECT spent_micros, held_micros FROM budget_counters") == [(3 * PRICE, PRICE)]
    assert await world.sql("SELECT request_id FROM holds") == [(admitted[1].charge.request_id,)]
    await assert_counters_match_ledger(world)
    assert await world.store.run(settle, admitted[1], Settlement("charged", 200), now_us())
    assert await world.sql("SELECT spent_micros, held_micros FROM budget_counters") == [(4 * PRICE, 0)]
    rows = await world.sql("SELECT COUNT(*) FROM ledger WHERE outcome = 'charged'")
    assert rows == [(4,)]
    assert (await world.admin(ledger.verify))["ok"]
