"""Console sessions live in the database: a session opened on one gateway process works on another
sharing the database (replicas, or `serve --workers`), and a sign-out on one ends it on every one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import ADMIN_TOKEN, Backend
from .console_helpers import csrf_of
from .procs import gateways, wait_ready


@pytest.mark.slow
async def test_a_session_works_on_every_replica(backend: Backend, fake: Any, tmp_path: Path) -> None:
    _, upstream_url = fake
    env = {"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN, "GATEWAY_ACCESS_LOG": "off"}
    with gateways(2, backend.url, upstream_url, tmp_path, **env) as (one, two):
        await wait_ready(one)
        await wait_ready(two)
        # (The cookie jar ignores ports: the two replicas on 127.0.0.1 share the cookie, as two
        # replicas behind one load balancer would.)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            form = await (await http.get(one.url + "/ui/signin")).text()
            signed = await http.post(
                one.url + "/ui/signin",
                data={"csrf": csrf_of(form), "token": ADMIN_TOKEN},
                allow_redirects=False,
            )
            assert signed.status == 303
            page = await http.get(two.url + "/ui/keys", allow_redirects=False)
            assert page.status == 200, await page.text()
            csrf = csrf_of(await page.text())
            made = await http.post(two.url + "/ui/teams", data={"csrf": csrf, "name": "made-on-two"})
            assert made.status == 200
            assert "made-on-two" in await (await http.get(one.url + "/ui/teams")).text()
            out = await http.post(one.url + "/ui/signout", data={"csrf": csrf}, allow_redirects=False)
            assert out.status == 303
            again = await http.get(two.url + "/ui/", allow_redirects=False)
            assert again.status == 303 and again.headers["Location"] == "/ui/signin"
