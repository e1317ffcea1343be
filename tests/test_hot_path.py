"""The hot path's statements: what one request costs the database when no optional feature is on.

Issue 24: every feature is paid for only when it is switched on. These count, not time, the SQL a
sequential chat request runs on SQLite (the writer connection's trace): a change that adds a
statement to every request, or reads a feature's table when nothing of it is configured, fails here
and must say so in docs/performance.md.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest

from gateway.store.sql import driver_connection

from .conftest import World, assert_counters_match_ledger

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)

REQUESTS = 5


def _verb(statement: str) -> str:
    """A statement's kind and first table: `INSERT holds`, `SELECT api_keys`, `COMMIT`."""
    verb = statement.split()[0].upper()
    outer = statement
    while (inner := re.sub(r"\([^()]*\)", "", outer)) != outer:  # subqueries and lists out
        outer = inner
    # The first table named, not counting the JSON arrays of parameters a statement reads.
    tables = [
        t
        for t in re.findall(r"\b(?:FROM|INTO|UPDATE|JOIN)\s+(\w+)", outer, re.IGNORECASE)
        if t != "json_each"
    ]
    return f"{verb} {tables[0]}" if tables and verb != "COMMIT" else verb


async def _traced(w: World, key: str, requests: int, **extra: Any) -> list[str]:
    """The statements the writer connection runs for `requests` sequential chat requests."""
    store: Any = w.store
    raw = driver_connection(store._connection())
    statements: list[str] = []
    raw.set_trace_callback(statements.append)
    try:
        for _ in range(requests):
            assert (await w.chat(key, **extra)).status == 200
    finally:
        raw.set_trace_callback(None)
    return statements


async def test_a_request_with_budgets_and_nothing_else_runs_the_same_few_statements(world: World) -> None:
    w = world
    key = (await w.key("alice"))["key"]
    await w.budget("user", "alice", "1000")
    await w.budget("team", "eng", "1000")
    for _ in range(2):  # the key is cached, the counters exist
        assert (await w.chat(key)).status == 200
    statements = await _traced(w, key, REQUESTS)
    per_request = Counter(_verb(s) for s in statements)
    # Admission: its key's state and budgets (two reads for the batch), the hold and its two
    # allocations, one conditional update per counter. Settlement: the hold deleted (its allocations
    # go with it, ON DELETE CASCADE), the ledger row, the counters moved, and the alert thresholds of
    # the counters moved (alerts are on by default, §9).
    assert {verb: n / REQUESTS for verb, n in per_request.items()} == {
        "BEGIN": 2,
        "COMMIT": 2,
        "SELECT api_keys": 1,
        "SELECT budgets": 1,
        "INSERT holds": 1,
        "INSERT allocations": 2,
        "INSERT budget_counters": 2,
        "INSERT ledger": 1,
        "DELETE holds": 1,
        "UPDATE budget_counters": 2,
        "SELECT budget_counters": 1,
    }, "\n".join(statements[: len(statements) // REQUESTS])
    await assert_counters_match_ledger(w)


async def test_an_end_user_without_budgets_of_their_own_costs_no_statement(world: World) -> None:
    """An end user is stored in the rows a request writes anyway; their budgets are read in
    the batch's one budget query, so naming one that has none adds nothing."""
    w = world
    key = (await w.key("alice"))["key"]
    await w.budget("user", "alice", "1000")
    assert (await w.chat(key)).status == 200
    plain = await _traced(w, key, REQUESTS)
    attributed = await _traced(w, key, REQUESTS, user="customer-42")
    assert [_verb(s) for s in attributed] == [_verb(s) for s in plain]
    assert any("customer-42" in s for s in attributed)
    rows = await w.sql("SELECT count(*) FROM ledger WHERE end_user = 'customer-42'")
    assert rows[0][0] == REQUESTS
