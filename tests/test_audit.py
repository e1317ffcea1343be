"""The audit log: one row per administrative change, by the CLI or the HTTP API, with before and after."""

from __future__ import annotations

import getpass
import json
from typing import Any

import pytest
from sqlalchemy import text

from gateway.store import open_store

from .admin_helpers import call, cli, cli_json, error, ok
from .conftest import Backend, World

SMALL, PRO = "openai/gpt-oss-20b", "google/gemini-2.5-pro"


async def _rows(url: str) -> list[dict[str, Any]]:
    store = open_store(url)
    try:
        rows = await store.run(
            lambda c: c.execute(
                text("SELECT actor, action, target, before, after FROM audit_log ORDER BY id")
            ).all()
        )
    finally:
        await store.close()
    return [
        {
            "actor": r[0],
            "action": r[1],
            "target": r[2],
            "before": r[3] and json.loads(r[3]),
            "after": r[4] and json.loads(r[4]),
        }
        for r in rows
    ]


async def _dump(url: str) -> str:
    store = open_store(url)
    try:
        rows = await store.run(lambda c: c.execute(text("SELECT * FROM audit_log")).all())
    finally:
        await store.close()
    return repr(rows)


async def test_each_cli_command_writes_one_row(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.url)
    me = f"cli {getpass.getuser()}"
    steps: list[tuple[tuple[str, ...], str, str]] = [
        (("teams", "create", "eng"), "team.create", "eng"),
        (("users", "create", "alice", "--team", "eng"), "user.create", "alice"),
        (("teams", "set", "eng", "--models", f"{SMALL},{PRO}"), "team.set", "eng"),
        (("users", "set", "alice", "--models", SMALL), "user.set", "alice"),
        (("users", "set", "alice", "--all-models"), "user.set", "alice"),
    ]
    for args, action, target in steps:
        before = len(await _rows(backend.url))
        await cli_json(capsys, *args)
        rows = await _rows(backend.url)
        assert len(rows) == before + 1, (args, rows)
        assert (rows[-1]["actor"], rows[-1]["action"], rows[-1]["target"]) == (me, action, target)
    rows = await _rows(backend.url)
    assert rows[2]["before"]["models"] is None and rows[2]["after"]["models"] == sorted([SMALL, PRO])
    assert rows[3]["after"]["models"] == [SMALL] and rows[4]["after"]["models"] is None

    key = await cli_json(capsys, "keys", "create", "alice", "--ttl", "30d", "--models", SMALL)
    secrets = [key["key"]]
    key_steps: list[tuple[tuple[str, ...], str]] = [
        (("keys", "set", key["id"], "--no-expiry", "--all-models"), "key.set"),
        (("keys", "block", key["id"]), "key.block"),
        (("keys", "unblock", key["id"]), "key.unblock"),
        (("budgets", "set", "user", "alice", "5", "--period", "daily"), "budget.set"),
        (("budgets", "set", "user", "alice", "7", "--period", "daily"), "budget.set"),
        (("budgets", "delete", "user", "alice", "--period", "daily"), "budget.delete"),
        (("keys", "rotate", key["id"], "--grace", "1h"), "key.rotate"),
        (("keys", "revoke", key["id"]), "key.revoke"),
    ]
    for args, action in key_steps:
        before = len(await _rows(backend.url))
        code, out, err = await cli(capsys, *args, "--json")
        assert code == 0, err
        if action == "key.rotate":
            secrets.append(json.loads(out)["key"])
        rows = await _rows(backend.url)
        assert len(rows) == before + 1, (args, rows)
        assert rows[-1]["action"] == action and rows[-1]["actor"] == me
    by_action = {r["action"]: r for r in await _rows(backend.url)}
    assert by_action["key.create"]["after"]["expires_at"] is not None
    assert by_action["key.set"]["before"]["expires_at"] is not None
    assert (
        by_action["key.set"]["after"]["expires_at"] is None
        and by_action["key.set"]["after"]["models"] is None
    )
    assert by_action["key.block"]["after"]["blocked"] and not by_action["key.unblock"]["after"]["blocked"]
    assert by_action["budget.delete"]["before"]["limit"] == 7 and by_action["budget.delete"]["after"] is None
    assert by_action["key.rotate"]["after"]["rotated_to"] == by_action["key.rotate"]["after"]["new_key"]["id"]
    dump = await _dump(backend.url)
    for secret in secrets:
        assert secret not in dump and secret[8:] not in dump

    # Read back through `gateway audit list`, filtered and paginated.
    page = await cli_json(capsys, "audit", "list", "--action", "budget.set", "--limit", "1")
    assert [e["after"]["limit"] for e in page["entries"]] == [5] and page["next_cursor"]
    page = await cli_json(capsys, "audit", "list", "--action", "budget.set", "--cursor", page["next_cursor"])
    assert [e["after"]["limit"] for e in page["entries"]] == [7] and page["next_cursor"] is None


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("keys", "create", "alice", "--ttl", "0"), "longer than 0"),
        (("keys", "create", "alice", "--expires", "2001-01-01T00:00:00Z"), "not in the future"),
        (("keys", "create", "alice", "--models", "acme/unpriced"), "acme/unpriced"),
        (("users", "set", "alice", "--models", "acme/unpriced"), "does not price"),
        (("keys", "rotate", "{revoked}"), "revoked"),
        (("keys", "block", "{revoked}"), "revoked"),
        (("keys", "set", "key_nope", "--all-models"), "No key with id"),
    ],
)
async def test_cli_mistakes_are_told_and_change_nothing(
    backend: Backend,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    words: str,
) -> None:
    monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.url)
    await cli_json(capsys, "users", "create", "alice")
    revoked = await cli_json(capsys, "keys", "create", "alice")
    await cli(capsys, "keys", "revoke", revoked["id"])
    before = await _rows(backend.url)
    keys = await cli_json(capsys, "keys", "list")
    code, _, err = await cli(capsys, *(a.replace("{revoked}", revoked["id"]) for a in args))
    assert code != 0 and words in err and "Traceback" not in err
    assert await _rows(backend.url) == before
    assert await cli_json(capsys, "keys", "list") == keys


async def test_http_changes_are_audited_with_the_client_address(admin_world: World) -> None:
    w = admin_world
    key = await ok(w, "POST", "/admin/v1/keys", 201, json={"user": "alice", "models": [SMALL]})
    await ok(w, "POST", f"/admin/v1/keys/{key['id']}/block")
    await error(
        await call(w, "POST", f"/admin/v1/keys/{key['id']}/rotate", json={"grace_seconds": -1}),
        400,
        "invalid_request",
    )
    page = await ok(w, "GET", "/admin/v1/audit?action=key.block")
    assert [(e["actor"], e["target"]) for e in page["entries"]] == [("admin-api 127.0.0.1", key["id"])]
    assert page["entries"][0]["before"]["blocked"] is False and page["entries"][0]["after"]["blocked"] is True
    everything = await ok(w, "GET", "/admin/v1/audit")
    assert [e["action"] for e in everything["entries"] if e["actor"].startswith("admin-api")] == [
        "key.create",
        "key.block",
    ]
    assert key["key"] not in json.dumps(everything)
    # Append-only: no endpoint edits or deletes it.
    for method in ("DELETE", "PUT", "PATCH", "POST"):
        assert (await call(w, method, "/admin/v1/audit")).status in (404, 405)
    await error(await call(w, "GET", "/admin/v1/audit?cursor=bogus"), 400, "invalid_request", "cursor")
    await error(await call(w, "GET", "/admin/v1/audit?limit=0"), 400, "invalid_request", "limit")
