"""End users and tags (contract §11): read from the request, validated, carried to the ledger row."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.core import admission, expiry, metering
from gateway.web.state import ACCESS_LOG

from .admin_helpers import cli_json, ok
from .conftest import Backend, World

BODY = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "hi"}]}


async def _chat(w: World, key: str, headers: dict[str, str] | None = None, **extra: Any) -> Any:
    return await w.client.post(
        "/api/v1/chat",
        json=BODY | extra,
        headers={"Authorization": f"Bearer {key}", **(headers or {})},
    )


async def _ledger(w: World) -> list[tuple[Any, ...]]:
    return await w.sql("SELECT request_id, end_user, tags FROM ledger ORDER BY admitted_at, request_id")


async def test_end_user_from_the_body_or_the_header_which_wins(admin_world: World) -> None:
    w = admin_world
    key = (await w.key("alice"))["key"]
    for extra, headers in (
        ({"user": "cust-1"}, {}),
        ({"user": "cust-1"}, {"X-Gateway-End-User": "cust-2"}),
        ({}, {"X-Gateway-End-User": "cust-3"}),
        ({}, {}),
    ):
        resp = await _chat(w, key, headers, **extra)
        assert resp.status == 200, await resp.text()
    assert [row[1] for row in await _ledger(w)] == ["cust-1", "cust-2", "cust-3", None]
    # The body goes upstream unchanged (its `user` too); the gateway's own headers do not.
    assert [r.body.get("user") for r in w.upstream.received] == ["cust-1", "cust-1", None, None]
    for received in w.upstream.received:
        assert not any(name.lower().startswith("x-gateway") for name in received.headers)


async def test_tags_are_stored_on_the_row_and_in_ledger_tags(admin_world: World) -> None:
    w = admin_world
    key = (await w.key("alice"))["key"]
    tags = ",".join(f"t{i}" for i in range(9)) + ",proj:a/b_c.d-e"
    resp = await _chat(w, key, {"X-Gateway-Tags": "search, billing", "X-Gateway-End-User": "u1"})
    assert resp.status == 200
    resp = await _chat(w, key, {"X-Gateway-Tags": tags})
    assert resp.status == 200
    (first, second) = await _ledger(w)
    assert first[1:] == ("u1", "search,billing")
    assert second[1:] == (None, tags)
    stored = await w.sql("SELECT request_id, tag FROM ledger_tags ORDER BY request_id, tag")
    assert sorted(stored) == sorted(
        [(first[0], "search"), (first[0], "billing")] + [(second[0], t) for t in tags.split(",")]
    )
    page = await ok(w, "GET", "/admin/v1/ledger", params={"tag": "billing"})
    assert [(e["request_id"], e["end_user"], e["tags"]) for e in page["entries"]] == [
        (first[0], "u1", ["search", "billing"])
    ]
    page = await ok(w, "GET", "/admin/v1/ledger", params={"end_user": "u1"})
    assert [e["request_id"] for e in page["entries"]] == [first[0]]
    page = await ok(w, "GET", "/admin/v1/ledger", params={"tag": "t3"})
    assert [e["request_id"] for e in page["entries"]] == [second[0]]
    assert (await ok(w, "GET", "/admin/v1/ledger", params={"end_user": "nobody"}))["entries"] == []


def test_only_spaces_and_tabs_around_a_tag_are_trimmed() -> None:
    from gateway.errors import InvalidRequest
    from gateway.web.attribution import tags

    assert tags(" a ,\tb\t") == ("a", "b")
    for bad in ("a,\u00a0b", "a\u2003", "\u00a0"):
        with pytest.raises(InvalidRequest, match="characters other than"):
            tags(bad)


@pytest.mark.parametrize(
    ("headers", "extra", "named"),
    [
        ({"X-Gateway-Tags": ",".join(f"t{i}" for i in range(11))}, {}, "has 11 tags"),
        ({"X-Gateway-Tags": "a" * 65}, {}, "longer than 64"),
        ({"X-Gateway-Tags": "ok,bad tag"}, {}, "characters other than"),
        ({"X-Gateway-Tags": "bad;tag"}, {}, "characters other than"),
        ({"X-Gateway-Tags": ""}, {}, "empty tag"),
        ({"X-Gateway-Tags": "a,,b"}, {}, "empty tag"),
        ({"X-Gateway-End-User": "u" * 129}, {}, "X-Gateway-End-User header is 129"),
        ({}, {"user": "u" * 129}, "`user` is 129"),
        ({}, {"user": 42}, "`user` must be a string"),
        ({"X-Gateway-End-User": "*"}, {}, "names every end user"),
        ({}, {"user": "*"}, "names every end user"),
    ],
)
async def test_bad_attribution_is_400_and_nothing_is_forwarded(
    admin_world: World, headers: dict[str, str], extra: dict[str, Any], named: str
) -> None:
    w = admin_world
    key = (await w.key("alice"))["key"]
    resp = await _chat(w, key, headers, **extra)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request"
    assert named in error["message"]
    if headers:
        assert next(iter(headers)) in error["message"]
    assert w.upstream.received == []
    assert await w.sql("SELECT * FROM ledger") == []
    assert await w.sql("SELECT * FROM holds") == []


async def test_an_expired_hold_keeps_its_attribution(admin_world: World) -> None:
    w = admin_world
    key = await w.key("alice")
    row = (await w.sql("SELECT id FROM users WHERE name = 'alice'"))[0]
    team = (await w.sql("SELECT id FROM teams WHERE name = 'eng'"))[0]
    who = metering.Caller(key["id"], row[0], "alice", team[0], "eng")
    charge = metering.Charge(
        "held-one", who, "openai/gpt-oss-20b", 1, 100_000, 100_000, False, "eu", ("x", "y")
    )
    at = metering.now_us()
    await w.store.run(admission.admit, charge, "dead-instance", at - 10**9)
    assert await w.store.run(expiry.expire_holds, at, at) == 1
    assert (await _ledger(w)) == [("held-one", "eu", "x,y")]
    assert sorted(await w.sql("SELECT tag FROM ledger_tags")) == [("x",), ("y",)]


async def test_access_log_names_end_user_and_tags(admin_world: World, capsys: Any) -> None:
    w = admin_world
    key = (await w.key("alice"))["key"]
    for fmt in ("json", "text"):
        await w.reconfigure(access_log=fmt)
        capsys.readouterr()
        resp = await _chat(w, key, {"X-Gateway-Tags": "a,b"}, user="cust 9")
        assert resp.status == 200
        w.client.app[ACCESS_LOG].flush()
        (line,) = [line for line in capsys.readouterr().out.splitlines() if line]
        if fmt == "json":
            entry = json.loads(line)
            assert (entry["end_user"], entry["tags"]) == ("cust 9", ["a", "b"])
        else:
            assert 'end_user="cust 9" tags=["a","b"]' in line


async def test_cli_ledger_list_filters(
    admin_world: World, backend: Backend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    w = admin_world
    monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.url)
    key = (await w.key("alice"))["key"]
    assert (await _chat(w, key, {"X-Gateway-Tags": "a"}, user="one")).status == 200
    assert (await _chat(w, key, {"X-Gateway-Tags": "b"}, user="two")).status == 200
    for params in ({"tag": "a"}, {"end_user": "two"}):
        http = await ok(w, "GET", "/admin/v1/ledger", params=params)
        ((name, value),) = params.items()
        assert await cli_json(capsys, "ledger", "list", f"--{name.replace('_', '-')}", value) == http
        assert len(http["entries"]) == 1


async def test_reports_by_tag_and_end_user_match_the_ledger_rows(admin_world: World) -> None:
    w = admin_world
    key = (await w.key("alice"))["key"]
    sent = [("a,b", "u1", 1), ("a", "u1", 2), (None, "u2", 3), ("b", None, 4), (None, None, 5)]
    for tags, user, messages in sent:
        headers = {"X-Gateway-Tags": tags} if tags else {}
        body = {"messages": [{"role": "user", "content": "x"}] * messages} | ({"user": user} if user else {})
        assert (await _chat(w, key, headers, **body)).status == 200
    rows = await w.sql("SELECT end_user, tags, credits_micros, message_count FROM ledger")
    want: dict[tuple[Any, Any], list[int]] = {}
    for end_user, tags, credits, messages in rows:
        for tag in tags.split(",") if tags else [None]:
            sums = want.setdefault((end_user, tag), [0, 0, 0])
            sums[0] += 1
            sums[1] += messages
            sums[2] += credits
    body = await ok(w, "GET", "/admin/v1/usage", params={"group_by": "end_user,tag"})
    got = {(r["end_user"], r["tag"]): [r["requests"], r["messages"], r["credits"]] for r in body["rows"]}
    assert got == {g: [s[0], s[1], s[2] / 1_000_000] for g, s in want.items()}
    # The two-tag request counts in both tags' rows, once in the totals.
    assert body["totals"]["requests"] == 5 and body["totals"]["messages"] == 15
    by_tag = await ok(w, "GET", "/admin/v1/usage", params={"group_by": "tag"})
    assert {r["tag"]: r["requests"] for r in by_tag["rows"]} == {"a": 2, "b": 2, None: 2}
    assert by_tag["totals"]["requests"] == 5
