"""`gateway apply` declares rate and concurrency limits (`[[limits]]`): plan, apply, again, prune,
bad entries at their line, and the export round trip."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.metering import now_us
from gateway.ops import apply, limiting, orgstate, services
from gateway.ops.orgfile import OrgFileError, parse
from gateway.store import Store

PRICED = ["openai/gpt-oss-20b"]

ORG = """\
version = 1

[[teams]]
name = "research"

[[users]]
name = "ada"
team = "research"

[[users.keys]]
name = "laptop"

[[limits]]
scope = "key"
subject = "ada/laptop"
kind = "requests"
limit = 10
per = "minute"

[[limits]]
scope = "user"
subject = "ada"
kind = "credits"
limit = 2.5
per = "hour"

[[limits]]
scope = "team"
subject = "research"
kind = "concurrent"
limit = 4

[[limits]]
scope = "end_user"
subject = "ada/*"
kind = "requests"
limit = 3
"""


async def _apply(store: Store, text: str, prune: bool = False) -> dict[str, Any]:
    org = parse(text, PRICED, "org.toml")
    return dict(await store.run(lambda c: apply.apply(c, org, now_us(), prune=prune, actor="test")))


async def _limits(store: Store) -> dict[tuple[str, str, str, str | None], Any]:
    return {
        (r["scope"], r["subject"], r["kind"], r["per"]): r["limit"]
        for r in await store.run(limiting.list_limits)
    }


async def test_plan_apply_again_change_prune_and_export(store: Store) -> None:
    org = parse(ORG, PRICED, "org.toml")
    planned = await store.read(apply.planned, org, now_us(), False)
    limits = [c for c in planned["changes"] if c["kind"] == "limit"]
    assert [(c["action"], c["target"], c["line"]) for c in limits] == [
        ("create", "limit key ada/laptop requests per minute", 13),
        ("create", "limit user ada credits per hour", 20),
        ("create", "limit end_user ada/* requests per minute", 33),
        ("create", "limit team research concurrent", 27),
    ]
    await _apply(store, ORG)
    key_id = (await store.run(services.list_keys))[0]["id"]
    assert await _limits(store) == {
        ("key", key_id, "requests", "minute"): 10,
        ("user", "ada", "credits", "hour"): 2.5,
        ("team", "research", "concurrent", None): 4,
        ("end_user", "ada/*", "requests", "minute"): 3,
    }
    again = await _apply(store, ORG)
    assert again["changes"] == []
    exported = await store.read(orgstate.export, now_us())
    assert "[[limits]]" in exported and 'subject = "ada/laptop"' in exported
    assert await store.read(apply.plan, parse(exported, PRICED, "exported"), now_us(), False) == []

    twenty = ORG.replace("limit = 10", "limit = 20")
    changed = await _apply(store, twenty)
    assert [(c["action"], c["before"], c["after"]) for c in changed["changes"]] == [
        ("change", {"limit": 10}, {"limit": 20})
    ]
    without = twenty.split('[[limits]]\nscope = "end_user"')[0]
    kept = await _apply(store, without)
    assert kept["changes"] == []  # not named, left alone without prune
    pruned = await _apply(store, without, prune=True)
    assert [(c["action"], c["target"]) for c in pruned["changes"]] == [
        ("delete", "limit end_user ada/* requests per minute")
    ]
    assert ("end_user", "ada/*", "requests", "minute") not in await _limits(store)


KEY = 'scope = "key"\nsubject = "ada/laptop"\n'


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        (KEY + 'kind = "requests"\nlimit = 0\n', "limits[0].limit"),
        (KEY + 'kind = "tokens"\nlimit = 5\n', "limits[0].kind"),
        (KEY + 'kind = "requests"\nlimit = 5\nper = "week"\n', "limits[0].per"),
        (KEY + 'kind = "concurrent"\nlimit = 5\nper = "minute"\n', "limits[0].per"),
        (KEY + 'kind = "requests"\nlimit = 5\nburst = 2\n', "limits[0].burst"),
        (KEY + 'kind = "requests"\n', "limits[0].limit"),
        (
            KEY + 'kind = "requests"\nlimit = 5\n[[limits]]\n' + KEY + 'kind = "requests"\nlimit = 6\n',
            "limits[1]",
        ),
    ],
)
def test_bad_limits_name_line_and_field(entry: str, where: str) -> None:
    text = ORG.split("[[limits]]")[0] + "[[limits]]\n" + entry
    with pytest.raises(OrgFileError) as caught:
        parse(text, PRICED, "org.toml")
    message = str(caught.value)
    assert message.startswith("org.toml:") and f": {where}: " in message, message


async def test_a_limit_on_an_undeclared_subject_changes_nothing(store: Store) -> None:
    text = ORG.replace('subject = "ada/laptop"', 'subject = "ada/phone"')
    with pytest.raises(OrgFileError) as caught:
        await _apply(store, text)
    assert "limits[0].subject" in str(caught.value)
    assert await store.run(services.list_teams) == []
