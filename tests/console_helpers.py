"""Helpers of the console tests: signing in through the form, reading a form's CSRF token."""

from __future__ import annotations

import re
from typing import Any

from .conftest import ADMIN_TOKEN

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    """The CSRF token of the first form on a page."""
    match = CSRF.search(html)
    assert match, "no CSRF field on the page"
    return match.group(1)


async def sign_in(client: Any, token: str = ADMIN_TOKEN) -> str:
    """Sign in through the form; the session's CSRF token (from the overview it lands on)."""
    form = await client.get("/ui/signin")
    assert form.status == 200
    answer = await client.post(
        "/ui/signin", data={"csrf": csrf_of(await form.text()), "token": token}, allow_redirects=False
    )
    assert answer.status == 303, await answer.text()
    page = await client.get("/ui/")
    assert page.status == 200, await page.text()
    return csrf_of(await page.text())
