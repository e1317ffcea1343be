"""The web console at /ui/ through aiohttp's test client: sessions, CSRF, headers, escaping, secrets,
audit, and that every form reaches the same service functions as the admin API (on both backends)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from markupsafe import escape

from gateway.console import security, sessions
from gateway.console.security import Throttle
from gateway.ops.settings import ConfigError, Settings

from .admin_helpers import cli
from .conftest import ADMIN_TOKEN, Backend, World, _secret
from .console_helpers import csrf_of, sign_in

PAGES = (
    "/ui/",
    "/ui/teams",
    "/ui/team?name=eng",
    "/ui/user?name=alice",
    "/ui/keys",
    "/ui/budgets",
    "/ui/budgets?expand=1",
    "/ui/ledger",
    "/ui/reports?group_by=team&group_by=user&group_by=end_user&group_by=tag",
    "/ui/alerts",
    "/ui/audit",
)
HOSTILE = ("<script>alert(1)</script>", '"><img src=x onerror=alert(1)>')


async def _count(w: World, table: str) -> int:
    return int((await w.sql(f"SELECT COUNT(*) FROM {table}"))[0][0])


async def test_no_session_redirects_to_sign_in(admin_world: World) -> None:
    c = admin_world.client
    for path in (*PAGES, "/ui/keys/key_0123456789abcdef", "/ui/reports.csv"):
        resp = await c.get(path, allow_redirects=False)
        assert resp.status == 303 and resp.headers["Location"] == "/ui/signin", path
    before = await _count(admin_world, "teams")
    resp = await c.post("/ui/teams", data={"name": "sneaky", "csrf": "x"}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/ui/signin"
    assert await _count(admin_world, "teams") == before
    resp = await c.get("/ui", allow_redirects=False)
    assert resp.status == 301 and resp.headers["Location"] == "/ui/"


async def test_headers_on_every_answer(admin_world: World) -> None:
    c = admin_world.client
    signin = await c.get("/ui/signin")
    await sign_in(c)
    answers = [signin, await c.get("/ui/static/console.css"), await c.get("/ui/nope")]
    answers += [await c.get(path) for path in PAGES]
    for resp in answers:
        csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "style-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["Referrer-Policy"] == "same-origin"
    for resp in answers[3:]:
        text = await resp.text()
        assert resp.status == 200, text
        # No inline script: every <script> names a file of ours, and no element has an on* handler.
        assert text.count("<script") == text.count('<script src="/ui/static/console.js" defer></script>')
        assert " onerror=" not in text and " onclick=" not in text and " style=" not in text


async def test_cookie_flags_and_secure_behind_https(admin_world: World) -> None:
    c = admin_world.client
    form = await c.get("/ui/signin")
    resp = await c.post(
        "/ui/signin", data={"csrf": csrf_of(await form.text()), "token": ADMIN_TOKEN}, allow_redirects=False
    )
    cookie = resp.headers.getall("Set-Cookie")
    session = next(v for v in cookie if v.startswith(security.COOKIE + "="))
    assert "HttpOnly" in session and "SameSite=Strict" in session and "Path=/ui/" in session
    assert "Max-Age=28800" in session and "Secure" not in session
    form = await c.get("/ui/signin", headers={"X-Forwarded-Proto": "https"})
    assert "Secure" in form.headers["Set-Cookie"]
    # (The client keeps a Secure cookie for HTTPS, so it is sent by hand here.)
    pre = form.headers["Set-Cookie"].split(";")[0]
    resp = await c.post(
        "/ui/signin",
        data={"csrf": csrf_of(await form.text()), "token": ADMIN_TOKEN},
        headers={"X-Forwarded-Proto": "https", "Cookie": pre},
        allow_redirects=False,
    )
    session = next(v for v in resp.headers.getall("Set-Cookie") if v.startswith(security.COOKIE + "="))
    assert "Secure" in session and "HttpOnly" in session
    # Only a digest of the id is stored.
    value = session.split(";")[0].split("=", 1)[1]
    stored = [r[0] for r in await admin_world.sql("SELECT id_hash FROM console_sessions")]
    assert sessions.digest(value) in stored and value not in stored


async def test_wrong_token_is_slowed_and_refused(admin_world: World) -> None:
    c = admin_world.client
    form = await c.get("/ui/signin")
    token = csrf_of(await form.text())
    started = asyncio.get_running_loop().time()
    resp = await c.post("/ui/signin", data={"csrf": token, "token": "wrong"})
    assert resp.status == 401 and "not the gateway&#39;s admin token" in await resp.text()
    assert asyncio.get_running_loop().time() - started >= 0.4
    again = await c.post("/ui/signin", data={"csrf": csrf_of(await resp.text()), "token": ADMIN_TOKEN})
    assert again.status == 429 and "Too many wrong tokens" in await again.text()
    assert await _count(admin_world, "console_sessions") == 0
    # Without the sign-in form's own token, nothing is even checked.
    resp = await c.post("/ui/signin", data={"token": ADMIN_TOKEN}, allow_redirects=False)
    assert resp.status == 403


def test_throttle_is_bounded_and_backs_off() -> None:
    throttle = Throttle(base=1.0, cap=8.0, max_addresses=3)
    assert throttle.wait("a", now=0) == 0
    assert [throttle.failed("a", now=0) for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert throttle.wait("a", now=1) == 8.0  # the answer's own delay, then the lockout
    for address in "bcde":
        throttle.failed(address, now=0)
    assert len(throttle) == 3 and throttle.wait("a", now=0) == 0
    throttle.succeeded("e")
    assert throttle.wait("e", now=0) == 0


async def test_sign_out_and_a_changed_token_end_sessions(admin_world: World) -> None:
    c = admin_world.client
    csrf = await sign_in(c)
    resp = await c.post("/ui/signout", data={"csrf": csrf}, allow_redirects=False)
    assert resp.status == 303
    assert (await c.get("/ui/", allow_redirects=False)).status == 303
    assert await _count(admin_world, "console_sessions") == 0
    await sign_in(admin_world.client)
    cookies = admin_world.client.session.cookie_jar
    await admin_world.reconfigure(admin_token=_secret("another-token"))
    admin_world.client.session.cookie_jar.update_cookies(
        {m.key: m.value for m in cookies}, admin_world.client.make_url("/ui/")
    )
    assert (await admin_world.client.get("/ui/", allow_redirects=False)).status == 303


async def test_console_off(world: World) -> None:
    assert (await world.client.get("/ui/signin")).status == 404  # no admin token
    await world.reconfigure(admin_token=_secret(ADMIN_TOKEN), ui="off")
    assert (await world.client.get("/ui/signin")).status == 404
    with pytest.raises(ConfigError, match="GATEWAY_UI: 'maybe' is not one of on, off"):
        Settings.load(environ={"GATEWAY_UI": "maybe"})
    assert Settings.load(environ={"GATEWAY_UI": "OFF"}).ui == "off"


def _forms(key_id: str, request_id: str) -> list[tuple[str, dict[str, str], str, str]]:
    """(path, form, table, condition) of each state-changing form; the condition counts its effect."""
    return [
        ("/ui/teams", {"name": "new-team"}, "teams", "name = 'new-team'"),
        ("/ui/users", {"user_name": "new-user"}, "users", "name = 'new-user'"),
        ("/ui/keys", {"user": "alice"}, "api_keys", "user_id = (SELECT id FROM users WHERE name = 'alice')"),
        (f"/ui/keys/{key_id}/block", {}, "api_keys", "blocked_at IS NOT NULL"),
        (f"/ui/keys/{key_id}/revoke", {}, "api_keys", "revoked_at IS NOT NULL"),
        (f"/ui/keys/{key_id}/rotate", {"grace": "1h"}, "api_keys", "rotated_to IS NOT NULL"),
        (f"/ui/keys/{key_id}/set", {"name": "renamed"}, "api_keys", "name = 'renamed'"),
        (
            "/ui/models",
            {"kind": "team", "name": "eng", "models": "openai/gpt-oss-20b"},
            "teams",
            "models IS NOT NULL",
        ),
        (
            "/ui/budgets",
            {"scope": "team", "subject": "eng", "period": "daily", "limit": "5"},
            "budgets",
            "deleted_at IS NULL",
        ),
        (
            "/ui/budgets/delete",
            {"scope": "user", "subject": "bob", "period": "daily"},
            "budgets",
            "deleted_at IS NOT NULL",
        ),
        (
            f"/ui/ledger/{request_id}/adjust",
            {"credits": "-0.05", "reason": "refund"},
            "ledger_adjustments",
            "1 = 1",
        ),
        ("/ui/signout", {}, "console_sessions", "1 = 1"),
    ]


async def test_csrf_missing_or_wrong_changes_nothing(admin_world: World) -> None:
    w = admin_world
    key = await w.key("alice")
    await w.budget("user", "bob", "3")
    request_id = (await w.chat(key["key"])).headers["X-Request-Id"]
    csrf = await sign_in(w.client)
    for path, form, table, condition in _forms(key["id"], request_id):
        before = await w.sql(f"SELECT COUNT(*) FROM {table} WHERE {condition}")
        audit_before = await _count(w, "audit_log")
        for token in (None, "wrong", csrf[:-1]):
            data = dict(form) if token is None else {**form, "csrf": token}
            resp = await w.client.post(path, data=data, allow_redirects=False)
            assert resp.status == 403, (path, token)
            assert "nothing was changed" in await resp.text()
        assert await w.sql(f"SELECT COUNT(*) FROM {table} WHERE {condition}") == before, path
        assert await _count(w, "audit_log") == audit_before
    # And with the token each form does its change (the last one signs out).
    for path, form, table, condition in _forms(key["id"], request_id):
        if path.endswith(("/revoke", "/rotate")):
            continue  # the key is blocked by now; rotation and revocation are tested below
        before = await w.sql(f"SELECT COUNT(*) FROM {table} WHERE {condition}")
        resp = await w.client.post(path, data={**form, "csrf": csrf}, allow_redirects=False)
        assert resp.status in (201, 303), (path, await resp.text())
        assert await w.sql(f"SELECT COUNT(*) FROM {table} WHERE {condition}") != before, path


async def _hostile_world(w: World) -> dict[str, Any]:
    """Teams, users, an end user and a budget named to break out of HTML, and a charged request."""
    team, user = HOSTILE
    await w.team(team)
    await w.user(user, team)
    key = await w.key(user)
    await w.budget("team", team, "100")
    await w.budget("end_user", f"{user}/*", "50")
    for end_user in HOSTILE:
        resp = await w.chat(key["key"], user=end_user)
        assert resp.status == 200, await resp.text()
    return key


async def test_hostile_names_are_escaped_on_every_page(admin_world: World) -> None:
    w = admin_world
    key = await _hostile_world(w)
    await sign_in(w.client)
    request_id = (await w.sql("SELECT request_id FROM ledger LIMIT 1"))[0][0]
    team, user = HOSTILE
    pages = [
        *PAGES,
        f"/ui/team?name={team}",
        f"/ui/user?name={user}",
        f"/ui/keys/{key['id']}",
        f"/ui/ledger/{request_id}",
        f"/ui/ledger?end_user={HOSTILE[0]}",
        f"/ui/budgets?scope=team&subject={team}",
        "/ui/budgets?expand=1",
    ]
    from urllib.parse import quote

    for path in pages:
        url = path.split("?")[0] + ("?" + quote(path.split("?", 1)[1], safe="=&") if "?" in path else "")
        resp = await w.client.get(url)
        text = await resp.text()
        assert resp.status == 200, (path, text[:500])
        for name in HOSTILE:
            assert name not in text, path
            assert "<img src=x" not in text and "<script>alert" not in text, path
    overview = await (await w.client.get("/ui/")).text()
    assert str(escape(team)) in overview  # the team is in the chart's legend, escaped


async def test_no_secret_or_admin_token_on_any_page_but_the_creation(admin_world: World) -> None:
    w = admin_world
    csrf = await sign_in(w.client)
    created = await w.client.post("/ui/keys", data={"csrf": csrf, "user": "alice", "name": "laptop"})
    text = await created.text()
    assert created.status == 201
    secret = text.split('id="secret" class="mono" readonly value="')[1].split('"')[0]
    assert secret.startswith("gwk_")
    (key_id,) = [r[0] for r in await w.sql("SELECT id FROM api_keys WHERE name = 'laptop'")]
    rotated = await w.client.post(f"/ui/keys/{key_id}/rotate", data={"csrf": csrf, "grace": "1h"})
    rotated_text = await rotated.text()
    assert rotated.status == 201 and "shown only this once" in rotated_text
    new_secret = rotated_text.split('readonly value="')[1].split('"')[0]
    assert (await w.chat(secret)).status == 200  # the old key still works during its grace
    for path in (*PAGES, f"/ui/keys/{key_id}", "/ui/user?name=alice", "/ui/audit?action=key.create"):
        page = await (await w.client.get(path)).text()
        for hidden in (secret, new_secret, secret[8:], ADMIN_TOKEN):
            assert hidden not in page, path
    assert "laptop" in await (await w.client.get("/ui/keys")).text()


async def test_changes_are_audited_as_console(admin_world: World) -> None:
    w = admin_world
    csrf = await sign_in(w.client)
    await w.client.post("/ui/teams", data={"csrf": csrf, "name": "ops"})
    await w.client.post("/ui/users", data={"csrf": csrf, "user_name": "dan", "team": "ops"})
    await w.client.post(
        "/ui/budgets",
        data={
            "csrf": csrf,
            "scope": "team",
            "subject": "ops",
            "period": "monthly",
            "limit": "20",
            "soft": "1",
            "alert_at": "50,90",
        },
    )
    rows = await w.sql("SELECT actor, action, target FROM audit_log WHERE actor LIKE 'console%' ORDER BY id")
    assert [(r[1], r[2]) for r in rows] == [
        ("team.create", "ops"),
        ("user.create", "dan"),
        ("budget.set", "team:ops:monthly"),
    ]
    assert {r[0] for r in rows} == {"console 127.0.0.1"}
    budget = (await w.sql("SELECT enforce, alert_at FROM budgets WHERE period = 'monthly'"))[0]
    assert (bool(budget[0]), budget[1]) == (False, "50,90")
    audit = await (await w.client.get("/ui/audit?action=budget.set")).text()
    assert "console 127.0.0.1" in audit and "team:ops:monthly" in audit


async def test_form_errors_have_the_api_words(admin_world: World) -> None:
    w = admin_world
    csrf = await sign_in(w.client)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    api = await w.client.post("/admin/v1/users", json={"name": "zed", "team": "nope"}, headers=headers)
    message = (await api.json())["error"]["message"]
    resp = await w.client.post("/ui/users", data={"csrf": csrf, "user_name": "zed", "team": "nope"})
    assert resp.status == 404 and str(escape(message)) in await resp.text()
    api = await w.client.put(
        "/admin/v1/budgets",
        json={"scope": "team", "subject": "eng", "period": "daily", "limit": "-1"},
        headers=headers,
    )
    message = (await api.json())["error"]["message"]
    resp = await w.client.post(
        "/ui/budgets",
        data={"csrf": csrf, "scope": "team", "subject": "eng", "period": "daily", "limit": "-1"},
    )
    text = await resp.text()
    assert resp.status == 400 and str(escape(message)) in text and 'id="limit-error"' in text
    resp = await w.client.post("/ui/teams", data={"csrf": csrf, "name": "eng"})
    assert resp.status == 409 and "A team named &#39;eng&#39; already exists." in await resp.text()
    resp = await w.client.get("/ui/ledger?from=yesterday")
    assert resp.status == 400 and 'id="from-error"' in await resp.text()


async def test_keys_block_unblock_rotate_revoke_and_edit(admin_world: World) -> None:
    w = admin_world
    key = await w.key("alice")
    csrf = await sign_in(w.client)
    resp = await w.client.post(f"/ui/keys/{key['id']}/block", data={"csrf": csrf})
    assert resp.status == 200 and "Key blocked" in await resp.text() and "blocked</span>" in await resp.text()
    assert (await w.chat(key["key"])).status == 401
    await w.client.post(f"/ui/keys/{key['id']}/unblock", data={"csrf": csrf})
    assert (await w.chat(key["key"])).status == 200
    expires = (datetime.now(UTC) + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    resp = await w.client.post(
        f"/ui/keys/{key['id']}/set",
        data={"csrf": csrf, "name": "ci", "expires_at": expires, "models": "openai/gpt-oss-20b"},
    )
    assert resp.status == 200
    stored = (await w.sql("SELECT name, models, expires_at FROM api_keys WHERE id = :id", id=key["id"]))[0]
    assert stored[0] == "ci" and stored[1] == '["openai/gpt-oss-20b"]' and stored[2] is not None
    resp = await w.client.post(f"/ui/keys/{key['id']}/set", data={"csrf": csrf, "expires_at": "2001-01-01"})
    assert resp.status == 400 and "is not in the future" in await resp.text()
    resp = await w.client.post(f"/ui/keys/{key['id']}/rotate", data={"csrf": csrf, "grace": "soon"})
    assert resp.status == 400 and "`grace` must be a duration" in await resp.text()
    resp = await w.client.post(f"/ui/keys/{key['id']}/rotate", data={"csrf": csrf, "grace": "0"})
    assert resp.status == 201
    listing = await (await w.client.get("/ui/keys?state=revoked")).text()
    assert key["id"] in listing
    new_id = (await w.sql("SELECT rotated_to FROM api_keys WHERE id = :id", id=key["id"]))[0][0]
    await w.client.post(f"/ui/keys/{new_id}/revoke", data={"csrf": csrf})
    assert "revoked</span>" in await (await w.client.get(f"/ui/keys/{new_id}")).text()


async def test_budgets_progress_and_ledger_pages(admin_world: World) -> None:
    w = admin_world
    key = await w.key("alice")
    await w.budget("user", "alice", "1")
    for _ in range(10):
        assert (await w.chat(key["key"])).status == 200
    csrf = await sign_in(w.client)
    budgets = await (await w.client.get("/ui/budgets")).text()
    assert 'aria-label="1 spent, 0 held of 1"' in budgets
    overview = await (await w.client.get("/ui/")).text()
    assert "Budgets at or over an alert threshold" in overview and "100 %" in overview
    first = await (await w.client.get("/ui/ledger?user=alice")).text()
    assert first.count('href="/ui/ledger/') == 10
    from gateway.console import ledger_page

    ledger_page.PAGE_SIZE, old = 4, ledger_page.PAGE_SIZE
    try:
        seen: list[str] = []
        path: str | None = "/ui/ledger?user=alice"
        while path:
            text = await (await w.client.get(path.replace("&amp;", "&"))).text()
            seen += [part.split('"')[0] for part in text.split('href="/ui/ledger/')[1:]]
            path = (
                text.split('rel="next"')[0].rsplit('href="', 1)[1].split('"')[0]
                if 'rel="next"' in text
                else None
            )
        assert len(seen) == len(set(seen)) == 10
    finally:
        ledger_page.PAGE_SIZE = old
    request_id = seen[0]
    resp = await w.client.post(
        f"/ui/ledger/{request_id}/adjust", data={"csrf": csrf, "credits": "-0.05", "reason": "x"}
    )
    text = await resp.text()
    assert resp.status == 200 and "Adjustment recorded" in text and "console 127.0.0.1" in text
    resp = await w.client.post(
        f"/ui/ledger/{request_id}/adjust", data={"csrf": csrf, "credits": "-5", "reason": "x"}
    )
    assert resp.status == 400 and "below zero" in await resp.text()


async def test_report_csv_equals_the_cli(
    admin_world: World, backend: Backend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    w = admin_world
    monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.url)
    key = await w.key("alice")
    for end_user in ("=cmd", "ann"):
        await w.chat(key["key"], user=end_user)
    await sign_in(w.client)
    today = datetime.now(UTC).date()
    tomorrow = today + timedelta(days=1)
    for group_by in ("team,model", "end_user,day", ""):
        query = f"from={today}&to={tomorrow}" + "".join(f"&group_by={g}" for g in group_by.split(",") if g)
        resp = await w.client.get(f"/ui/reports.csv?{query}")
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/csv")
        args = ["report", "--from", str(today), "--to", str(tomorrow), "--format", "csv"]
        code, out, _ = await cli(capsys, *args, *(["--group-by", group_by] if group_by else []))
        assert code == 0 and await resp.read() == out.encode()
    page = await (await w.client.get(f"/ui/reports?from={today}&to={tomorrow}&group_by=end_user")).text()
    assert "Download CSV" in page and "&#39;=cmd" not in page and "=cmd" in page


def test_openapi_is_unaffected() -> None:
    """The console is HTML, not API: every route it adds is under /ui, and none is documented."""
    from gateway.web.app import create_app
    from gateway.web.openapi import SPEC

    with_console = create_app(Settings(admin_token=_secret(ADMIN_TOKEN)))
    without = create_app(Settings())
    paths = {str(r.resource.canonical) for r in with_console.router.routes() if r.resource is not None}
    plain = {str(r.resource.canonical) for r in without.router.routes() if r.resource is not None}
    assert paths - plain and all(path.startswith("/ui") for path in paths - plain)
    assert not any(path.startswith("/ui") for path in SPEC["paths"])
