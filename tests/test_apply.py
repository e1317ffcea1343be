"""`gateway apply`, `--plan` and `export`: plan, apply, apply again, prune, bad files, the round trip."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from gateway.core.metering import now_us
from gateway.core.windows import Rule
from gateway.errors import Conflict
from gateway.ops import access, apply, budgeting, ledger, orgstate, services
from gateway.ops.orgfile import OrgFileError, parse
from gateway.store import Store

from .admin_helpers import cli
from .conftest import Backend, World, assert_counters_match_ledger

PRICED = ["openai/gpt-oss-20b", "openai/gpt-oss-120b", "google/gemini-2.5-flash"]

ORG = """\
version = 1

[[teams]]
name = "research"
models = ["openai/gpt-oss-20b", "google/gemini-2.5-flash"]

[[teams]]
name = "ops"

[[users]]
name = "ada"
team = "research"
models = ["openai/gpt-oss-20b"]

[[users.keys]]
name = "laptop"

[[users.keys]]
name = "ci"
models = ["openai/gpt-oss-20b"]
expires_at = 2099-06-30T00:00:00Z

[[users]]
name = "ben"
team = "ops"
keys = [{ name = "server", blocked = true }]

[[budgets]]
scope = "team"
subject = "research"
period = "monthly"
limit = 500

[[budgets]]
scope = "user"
subject = "ada"
period = "daily"
limit = 20.5
soft = true
alert_at = [50, 90]

[[budgets]]
scope = "key"
subject = "ada/ci"
period = "total"
limit = 100

[[budgets]]
scope = "end_user"
subject = "ada/*"
period = "daily"
limit = 2
"""


async def _audit_rows(store: Store) -> list[Any]:
    def rows(conn: Any) -> list[Any]:
        return list(conn.execute(text("SELECT actor, action, target FROM audit_log ORDER BY id")).all())

    return await store.run(rows)


async def test_plan_apply_again_and_audit(
    backend: Backend,
    store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.url)
    path = tmp_path / "org.toml"
    path.write_text(ORG)
    sha = hashlib.sha256(ORG.encode()).hexdigest()

    code, out, _ = await cli(capsys, "apply", "--plan", str(path))
    assert code == 2, out
    assert "+ create team research" in out and "+ create key ada/ci" in out
    assert "Plan: 11 to create, 0 to change, 0 to delete." in out
    assert await store.run(services.list_teams) == []  # a plan changes nothing
    code, out, _ = await cli(capsys, "apply", "--plan", "--json", str(path))
    planned = json.loads(out)
    assert code == 2 and planned["applied"] is False and planned["summary"]["create"] == 11
    assert {c["target"]: c["line"] for c in planned["changes"]}["key ben/server"] == 26

    code, out, _ = await cli(capsys, "apply", "--json", str(path))
    applied = json.loads(out)
    assert code == 0 and applied["applied"] is True and applied["sha256"] == sha
    assert [c["target"] for c in applied["changes"]] == [c["target"] for c in planned["changes"]]
    secrets = {(k["user"], k["name"]): k["key"] for k in applied["created_keys"]}
    assert set(secrets) == {("ada", "laptop"), ("ada", "ci"), ("ben", "server")}
    assert all(s.startswith("gwk_") for s in secrets.values())

    # What was made is what the file says.
    teams = {t["name"]: t["models"] for t in await store.run(services.list_teams)}
    assert teams == {"research": ["google/gemini-2.5-flash", "openai/gpt-oss-20b"], "ops": None}
    users = {u["name"]: (u["team"], u["models"]) for u in await store.run(services.list_users)}
    assert users == {"ada": ("research", ["openai/gpt-oss-20b"]), "ben": ("ops", None)}
    keys = {(k["user"], k["name"]): k for k in await store.run(services.list_keys)}
    assert keys[("ben", "server")]["blocked"] and keys[("ada", "ci")]["expires_at"] == "2099-06-30T00:00:00Z"
    budgets = {(b["scope"], b["subject"], b["period"]): b for b in await store.run(budgeting.list_budgets)}
    assert set(budgets) == {
        ("team", "research", "monthly"),
        ("user", "ada", "daily"),
        ("key", keys[("ada", "ci")]["id"], "total"),
        ("end_user", "ada/*", "daily"),
    }
    soft = budgets[("user", "ada", "daily")]
    assert (soft["limit"], soft["enforce"], soft["alert_at"]) == (20.5, False, [50, 90])

    # Every change audited by `apply` with the file's digest, and one row for the whole apply.
    rows = await _audit_rows(store)
    assert rows and all(actor.startswith(f"apply sha256:{sha} (cli ") for actor, _, _ in rows)
    actions = [action for _, action, _ in rows]
    assert actions.count("team.create") == 2 and actions.count("key.create") == 3
    assert actions.count("budget.set") == 4 and actions[-1] == "org.apply"

    # The same file again: nothing to do, nothing done.
    code, out, _ = await cli(capsys, "apply", "--plan", str(path))
    assert code == 0 and "No changes" in out
    code, out, _ = await cli(capsys, "apply", "--json", str(path))
    assert code == 0 and json.loads(out)["changes"] == [] and json.loads(out)["created_keys"] == []
    assert len(await _audit_rows(store)) == len(rows)

    # `gateway export | gateway apply --plan -`: no change; `-o` writes the same text to a file.
    code, exported, _ = await cli(capsys, "export")
    assert code == 0 and exported.startswith("# ") and 'subject = "ada/ci"' in exported
    assert not any(secret in exported for secret in secrets.values())
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(exported.encode())))
    code, out, _ = await cli(capsys, "apply", "--plan", "-")
    assert code == 0 and "No changes: the organisation matches <stdin>." in out
    assert (await cli(capsys, "export", "-o", str(tmp_path / "out.toml")))[0] == 0
    assert (tmp_path / "out.toml").read_text() == exported

    # A change: only what differs is changed.
    path.write_text(ORG.replace("limit = 500", "limit = 400").replace("blocked = true", "blocked = false"))
    code, out, _ = await cli(capsys, "apply", str(path))
    assert code == 0
    assert "~ change budget team research monthly  limit: 500 -> 400" in out
    assert "~ change key ben/server  blocked: true -> false" in out
    assert "Applied: 0 created, 2 changed, 0 deleted." in out
    assert not {k["name"]: k for k in await store.run(services.list_keys)}["server"]["blocked"]


async def test_prune_revokes_keys_deletes_budgets_keeps_ledger(world: World, tmp_path: Path) -> None:
    at = now_us()
    org = parse(ORG, PRICED, "org.toml")
    applied = await world.store.run(lambda c: apply.apply(c, org, at, actor="test"))
    secret = {k["name"]: k["key"] for k in applied["created_keys"]}["laptop"]
    for _ in range(3):
        resp = await world.chat(secret)
        assert resp.status == 200, await resp.text()
    ledger_before = await world.sql(
        "SELECT request_id, credits_micros, outcome FROM ledger ORDER BY request_id"
    )
    assert len(ledger_before) == 3

    # Without --prune, what the file lacks stays: the fixture's team, users and nothing else changes.
    smaller = ORG.split("[[budgets]]")[0].replace('[[users.keys]]\nname = "laptop"\n\n', "")
    org = parse(smaller, PRICED, "smaller.toml")
    assert await world.store.read(apply.plan, org, now_us(), False) == []

    # A key without a name (which no file can declare) is pruned too; one in a rotation's grace is
    # left to its grace, and the key that replaced it (same name) is the file's.
    unnamed = await world.key("carol")
    ci = {k["name"]: k["id"] for k in applied["created_keys"]}["ci"]
    rotated = await world.admin(access.rotate_key, ci, 3600, now_us())
    grace_ends = await world.sql("SELECT revoked_at FROM api_keys WHERE id = :id", id=ci)

    changes = await world.store.read(apply.plan, org, now_us(), True)
    assert sorted((c.action, c.target) for c in changes) == [
        ("delete", "budget end_user ada/* daily"),
        ("delete", "budget key ada/ci total"),
        ("delete", "budget team research monthly"),
        ("delete", "budget user ada daily"),
        ("revoke", "key ada/laptop"),
        ("revoke", "key carol/(unnamed)"),
    ]
    outcome = await world.store.run(lambda c: apply.apply(c, org, now_us(), prune=True, actor="test"))
    assert outcome["summary"] == {"create": 0, "change": 0, "delete": 6}
    assert (await world.admin(services.key_object, unnamed["id"]))["revoked_at"] is not None
    assert await world.sql("SELECT revoked_at FROM api_keys WHERE id = :id", id=ci) == grace_ends
    assert (await world.admin(services.key_object, rotated["id"]))["revoked_at"] is None

    resp = await world.chat(secret)
    assert resp.status == 401 and (await resp.json())["error"]["reason"] == "revoked"
    # Revoked, not deleted; budgets deleted as `budgets delete` does (rows and counters kept); the
    # ledger untouched.
    keys = await world.sql("SELECT name, revoked_at FROM api_keys WHERE name = 'laptop'")
    assert len(keys) == 1 and keys[0][1] is not None
    assert await world.admin(budgeting.list_budgets) == []
    assert (await world.sql("SELECT COUNT(*) FROM budgets WHERE deleted_at IS NOT NULL"))[0][0] == 4
    after = await world.sql("SELECT request_id, credits_micros, outcome FROM ledger ORDER BY request_id")
    assert after == ledger_before
    assert (await world.admin(ledger.verify))["ok"]
    await assert_counters_match_ledger(world)
    # Pruned once, nothing more to prune; teams and users are never deleted.
    assert await world.store.read(apply.plan, org, now_us(), True) == []
    users = {u["name"] for u in await world.admin(services.list_users)}
    assert users == {"alice", "bob", "carol", "ada", "ben"}


BAD = """\
version = 1

[[teams]]
name = "research"

[[users]]
name = "ada"
team = "research"

[[users]]
name = "eve"
team = "nowhere"
"""


async def test_one_bad_entry_changes_nothing(
    backend: Backend,
    store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.url)
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    code, _, err = await cli(capsys, "apply", str(path))
    assert code == 1
    assert f"{path}:12: users[1].team: no team named 'nowhere'" in err
    assert await store.run(services.list_teams) == [] and await _audit_rows(store) == []
    # A fault only the database can find, in the middle of the file, also stops it all.
    await store.run(services.create_user, "eve", None, now_us())
    path.write_text(BAD.replace("nowhere", "research"))
    code, _, err = await cli(capsys, "apply", str(path))
    assert code == 1 and f"{path}:12: users[1].team: user 'eve' is in no team" in err
    assert await store.run(services.list_teams) == []


async def test_export_round_trip(world: World, tmp_path: Path) -> None:
    """A populated organisation, made by hand: export, then plan that file: no change."""
    at = now_us()
    await world.admin(access.set_models, "team", "eng", ["openai/gpt-oss-20b", "openai/gpt-oss-120b"], at)
    await world.admin(access.set_models, "user", "bob", ["openai/gpt-oss-20b"], at)
    await world.team("idle")
    laptop = await world.admin(
        lambda c: services.create_key(
            c, "alice", "laptop", at, models=["openai/gpt-oss-20b"], expires_at=at + 86_400_000_000
        )
    )
    old = await world.admin(services.create_key, "bob", "ci", at)
    await world.admin(access.rotate_key, old["id"], 3600, at)  # the old one in its grace: left out
    gone = await world.admin(services.create_key, "carol", "gone", at)
    await world.admin(services.revoke_key, gone["id"], at)  # revoked: left out
    unnamed = await world.key("carol")  # no name: left out, with a note
    blocked = await world.admin(services.create_key, "carol", "blocked", at)
    await world.admin(access.block_key, blocked["id"], at)
    await world.admin(
        lambda c: budgeting.set_budget(c, "user", "alice", "daily", "5", at, enforce=False, alert_at=[50, 90])
    )
    await world.admin(
        lambda c: budgeting.set_budget(c, "team", "eng", "monthly", "123456789012.345678", at, alert_at=[])
    )
    await world.budget("key", laptop["id"], "3", "total")
    await world.budget("key", unnamed["id"], "3", "total")
    await world.budget("end_user", "alice/*", "2")
    await world.budget("end_user", "alice/vip", "10", "weekly")
    await world.budget("team", "idle", "1")
    await world.admin(budgeting.delete_budget, "team", "idle", "daily", at)  # deleted: left out
    await world.admin(
        lambda c: budgeting.set_budget(
            c, "user", "bob", "monthly", "9", at, timezone="America/Los_Angeles", month_starts_on=15
        )
    )
    await world.admin(
        lambda c: budgeting.set_budget(c, "user", "bob", "weekly", "9", at, week_starts="sunday")
    )
    # A budget made from the default by a request naming an end user: derived, left out.
    resp = await world.chat(laptop["key"], **{"user": "cust-1"})
    assert resp.status == 200, await resp.text()
    assert any(b["from_default"] for b in await world.admin(lambda c: budgeting.list_budgets(c, expand=True)))

    exported = await world.store.read(orgstate.export, now_us())
    assert f"live key {unnamed['id']} of carol has no name" in exported
    assert "gone" not in exported and "cust-1" not in exported and 'idle"\nperiod' not in exported
    org = parse(exported, PRICED, "export.toml")
    assert await world.store.read(apply.plan, org, now_us(), False) == []
    names = {(k.user, k.name): k for k in org.keys()}
    assert set(names) == {("alice", "laptop"), ("bob", "ci"), ("carol", "blocked")}
    assert names[("carol", "blocked")].blocked and names[("alice", "laptop")].models == ["openai/gpt-oss-20b"]
    budgets = {b.ident: b for b in org.budgets}
    assert budgets[("user", "alice", "daily")].soft and budgets[("user", "alice", "daily")].alert_at == (
        50,
        90,
    )
    assert budgets[("team", "eng", "monthly")].alert_at == () and ("key", "alice/laptop", "total") in budgets
    assert {("end_user", "alice/*", "daily"), ("end_user", "alice/vip", "weekly")} <= set(budgets)
    # A window rule is written where it is not UTC, monday, 1.
    cycle = budgets[("user", "bob", "monthly")]
    assert (cycle.timezone, cycle.week_starts, cycle.month_starts_on) == ("America/Los_Angeles", None, 15)
    assert budgets[("user", "bob", "weekly")].declared_rule() == {"week_starts": "sunday"}
    assert budgets[("user", "alice", "daily")].declared_rule() == {}
    assert 'timezone = "America/Los_Angeles"\nmonth_starts_on = 15\n' in exported
    # Applying an export changes nothing, and exporting again gives the same file.
    outcome = await world.store.run(lambda c: apply.apply(c, org, now_us(), actor="test"))
    assert outcome["changes"] == []
    assert await world.store.read(orgstate.export, now_us()) == exported


ONE = 'version = 1\n[[budgets]]\nscope = "team"\nsubject = "t"\nperiod = "daily"\nlimit = 1\n'


@pytest.mark.parametrize(
    ("source", "where"),
    [
        ('version = 1\n[[teams]]\nname = "a"\ncolour = "blue"\n', ":4: teams[0].colour: unknown field"),
        ("[[teams]]\nname = 'a'\n", ":1: version: `version` is missing"),
        ("version = 2\n", ":1: version: `version` must be 1"),
        ("version = 1\nwebhooks = []\n", ":2: webhooks: unknown field (webhooks are settings"),
        (
            'version = 1\n[[teams]]\nname = "a"\n\n[[teams]]\nname = "a"\n',
            ":6: teams[1].name: team 'a' is declared twice (first at line 3)",
        ),
        (
            'version = 1\n[[users]]\nname = "u"\n[[users.keys]]\nname = "k"\n[[users.keys]]\nname = "k"\n',
            ":7: users[0].keys[1].name: key 'k' of user 'u' is declared twice",
        ),
        (
            'version = 1\n[[users]]\nname = "u"\nkeys = [{ name = "k", colour = 1 }]\n',
            ":4: users[0].keys[0].colour: unknown field",
        ),
        (
            'version = 1\n[[users]]\nname = "u"\nmodels = ["x/y"]\n',
            ":4: users[0].models: `models` names models this gateway does not price: 'x/y'",
        ),
        ('version = 1\n[[users]]\nname = "u"\nmodels = []\n', ":4: users[0].models: `models` is empty"),
        (
            'version = 1\n[[budgets]]\nscope = "team"\nsubject = "t"\nperiod = "daily"\nlimit = 1.0000001\n',
            ":6: budgets[0].limit: `limit`:",
        ),
        (
            'version = 1\n[[budgets]]\nscope = "team"\nsubject = "t"\nperiod = "hourly"\nlimit = 1\n',
            ":5: budgets[0].period: `period` must be one of daily, weekly, monthly, total",
        ),
        (
            ONE + "alert_at = [0]\n",
            ":7: budgets[0].alert_at:",
        ),
        (
            ONE + 'timezone = "Mars/Olympus"\n',
            ":7: budgets[0].timezone: unknown time zone 'Mars/Olympus'",
        ),
        (
            ONE + "month_starts_on = 29\n",
            ":7: budgets[0].month_starts_on: the month's start day must be a whole number from 1 to 28",
        ),
        (
            ONE + 'month_starts_on = "15"\n',
            ":7: budgets[0].month_starts_on: the month's start day must be a whole number",
        ),
        (
            ONE + 'week_starts = "funday"\n',
            ":7: budgets[0].week_starts: 'funday' is not a week day",
        ),
        (
            'version = 1\n[[budgets]]\nscope = "team"\nsubject = "t"\nlimit = 1\n',
            ":2: budgets[0].period: `period` is missing",
        ),
        (
            ONE + ONE.removeprefix("version = 1\n"),
            ":7: budgets[1]: a daily team budget of 't' is declared twice (first at line 2)",
        ),
        (
            'version = 1\n[[users]]\nname = "u"\n[[users.keys]]\nname = "k"\nexpires_at = "soon"\n',
            ":6: users[0].keys[0].expires_at:",
        ),
        (
            'version = 1\n[[users]]\nname = "u"\n[[users.keys]]\nname = "k"\nblocked = "yes"\n',
            ":6: users[0].keys[0].blocked: `blocked` must be true or false",
        ),
        ('version = 1\n[[teams]\nname = "a"\n', ":2: toml:"),
    ],
)
def test_bad_files_name_line_and_field(source: str, where: str) -> None:
    with pytest.raises(OrgFileError) as caught:
        parse(source, PRICED, "f.toml")
    assert "f.toml" + where in caught.value.message, caught.value.message


def test_lines_of_common_layouts() -> None:
    """The scan finds tables and keys in array-of-tables layouts, with comments, multi-line values,
    inline tables and nested [[users.keys]] counted per user."""
    source = """\
# organisation
version = 1

[[users]]   # the first
name = "a"
models = [
  "nope/1",
]

[[users]]
name = "b"
note = \"\"\"
[[users]]
name = "fake"
\"\"\"

[[users.keys]]
name = "k1"

[[users.keys]]
name = "k2"
models = ["nope/2"]

[[users]]
name = "c"
keys = [
  { name = "k3", models = ["nope/3"] },
]

[[users]]
name = "d"

[[users.keys]]
name = "k4"
blocked = 1
"""
    with pytest.raises(OrgFileError) as caught:
        parse(source, PRICED, "f.toml")
    problems = [(p["line"], p["field"]) for p in caught.value.details["problems"]]
    assert problems == [
        (6, "users[0].models"),
        (12, "users[1].note"),
        (22, "users[1].keys[1].models"),
        (26, "users[2].keys[0].models"),
        (35, "users[3].keys[0].blocked"),
    ]


async def test_readme_example_applies(store: Store) -> None:
    """The README's full example is a file that applies, and then plans no change."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Organisation as code", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    org = parse(example, PRICED, "README.md")
    outcome = await store.run(lambda c: apply.apply(c, org, now_us(), actor="test"))
    assert outcome["summary"] == {"create": 15, "change": 0, "delete": 0}
    assert await store.read(apply.plan, org, now_us(), False) == []
    cycle = next(
        b for b in await store.run(budgeting.list_budgets, "team", "ops") if b["period"] == "monthly"
    )
    assert (cycle["timezone"], cycle["month_starts_on"]) == ("America/Los_Angeles", 15)


async def test_a_failing_change_undoes_the_others(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """All or nothing: a service refusing the last change rolls back the teams, users, keys and
    budgets already made in the same transaction, and names the entry's line."""
    real = budgeting.set_budget

    def refusing(conn: Any, scope: Any, subject: Any, *args: Any, **kwargs: Any) -> Any:
        if scope == "team":
            raise Conflict("refused for the test", field="subject")
        return real(conn, scope, subject, *args, **kwargs)

    monkeypatch.setattr(budgeting, "set_budget", refusing)
    org = parse(ORG, PRICED, "org.toml")
    with pytest.raises(OrgFileError) as caught:
        await store.run(lambda c: apply.apply(c, org, now_us(), actor="test"))
    assert caught.value.message == "org.toml:28: budget team research monthly: refused for the test"
    assert await store.run(services.list_teams) == [] and await store.run(services.list_keys) == []
    assert await store.run(budgeting.list_budgets) == [] and await _audit_rows(store) == []


async def test_budget_window_rules_plan_apply_and_change(store: Store) -> None:
    """`timezone`, `week_starts`, `month_starts_on`: created as declared, a second apply changes
    nothing, a change of zone is planned as one, and parts left out are left as they are."""
    at = now_us()
    source = (
        'version = 1\n[[teams]]\nname = "t"\n[[budgets]]\nscope = "team"\nsubject = "t"\n'
        'period = "monthly"\nlimit = 5\ntimezone = "Europe/Berlin"\nmonth_starts_on = 15\n'
    )
    org = parse(source, PRICED, "org.toml")
    changes = await store.read(apply.plan, org, at, False)
    created = next(c for c in changes if c.kind == "budget")
    assert created.after == {
        "limit": 5,
        "soft": False,
        "alert_at": None,
        "timezone": "Europe/Berlin",
        "month_starts_on": 15,
    }
    await store.run(
        lambda c: apply.apply(c, org, at, actor="test", rule_defaults=Rule("Asia/Tokyo", "sunday"))
    )
    (budget,) = await store.run(budgeting.list_budgets, "team", "t", at)
    # Declared parts as declared; the week day, not declared, from the gateway's defaults.
    assert (budget["timezone"], budget["week_starts"], budget["month_starts_on"]) == (
        "Europe/Berlin",
        "sunday",
        15,
    )
    assert budget["window_start"][8:10] == "15" and budget["window_start"][-6:] in ("+01:00", "+02:00")
    assert await store.read(apply.plan, org, at, False) == []
    moved = parse(source.replace("Europe/Berlin", "Asia/Tokyo"), PRICED, "org.toml")
    (change,) = await store.read(apply.plan, moved, at, False)
    assert (change.action, change.before, change.after) == (
        "change",
        {"timezone": "Europe/Berlin"},
        {"timezone": "Asia/Tokyo"},
    )
    # Left out: left as it is.
    bare = parse(source.replace('timezone = "Europe/Berlin"\n', ""), PRICED, "org.toml")
    assert await store.read(apply.plan, bare, at, False) == []
