"""The console end to end in a real Chromium (Debian's, driven by Playwright): an administrator's
day, keyboard-only navigation, a phone-width screen, accessibility (axe-core) and no console errors
(a CSP violation is one). Screenshots of every page go to tests/artifacts/ (git-ignored).

Skipped, saying why, when Chromium or Playwright is missing; CI installs both (.ci/run, the
`test` extras). Run on SQLite only: the pages' PostgreSQL side is in tests/test_console.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ADMIN_TOKEN, World

CHROMIUM = os.environ.get("GATEWAY_TEST_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).parent / "artifacts"
AXE = Path(__file__).parent / "vendor" / "axe-core-4.14.1.min.js"
PAGES = (
    ("overview", "/ui/"),
    ("teams", "/ui/teams"),
    ("team", "/ui/team?name=research"),
    ("user", "/ui/user?name=ada"),
    ("keys", "/ui/keys"),
    ("budgets", "/ui/budgets"),
    ("ledger", "/ui/ledger"),
    ("reports", "/ui/reports?group_by=team&group_by=model"),
    ("alerts", "/ui/alerts"),
    ("audit", "/ui/audit"),
)

try:
    from playwright.async_api import Browser, Page, async_playwright
except ImportError:  # pragma: no cover - the `test` extras bring it
    async_playwright = None


def _missing() -> str | None:
    if async_playwright is None:
        return "the console's browser tests need Playwright: pip install -e '.[test]'"
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        return f"the console's browser tests need Chromium at {CHROMIUM}: apt-get install chromium"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@pytest.fixture
async def browser(backend: Any) -> AsyncIterator[Browser]:
    if backend.name != "sqlite":
        pytest.skip("browser tests run on SQLite; tests/test_console.py covers PostgreSQL's pages")
    async with async_playwright() as p:  # type: ignore[misc]
        chromium = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        await chromium.close()


class Watched:
    """A page whose console errors and uncaught exceptions are collected."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))


async def _open(browser: Browser, base: str, width: int = 1280) -> Watched:
    context = await browser.new_context(viewport={"width": width, "height": 900}, accept_downloads=True)
    await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    watched = Watched(await context.new_page())
    watched.page.set_default_timeout(10_000)
    await watched.page.goto(base + "/ui/")
    assert watched.page.url.endswith("/ui/signin")
    await watched.page.fill("#f-token", ADMIN_TOKEN)
    await watched.page.click("button[type=submit]")
    await watched.page.wait_for_url(base + "/ui/")
    return watched


async def _axe(page: Page) -> list[str]:
    """axe-core's serious and critical violations on the page (run over CDP: the CSP stays on)."""
    if not await page.evaluate("typeof window.axe !== 'undefined'"):
        await page.evaluate(AXE.read_text(encoding="utf-8") + "\n;undefined")
    found = await page.evaluate(
        "axe.run(document, {resultTypes: ['violations']}).then(r => r.violations"
        ".filter(v => v.impact === 'serious' || v.impact === 'critical')"
        ".map(v => v.id + ': ' + v.help + ' ' + v.nodes.map(n => n.target.join(' ')).join(', ')))"
    )
    return list(found)


async def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"console-{name}.png"), full_page=True)


async def test_an_administrators_day(admin_world: World, browser: Browser) -> None:
    w = admin_world
    base = str(w.client.make_url("")).rstrip("/")
    watched = await _open(browser, base)
    page = watched.page
    # A team, a user and a key through the forms; the secret is shown once.
    await page.click("nav >> text=Teams & users")
    await page.fill("#f-name", "research")
    await page.click("text=Create team")
    await page.wait_for_url("**/ui/team?**")
    await page.click("text=Teams & users")
    await page.fill("#f-user_name", "ada")
    await page.select_option("#f-team", "research")
    await page.click("text=Create user")
    await page.wait_for_url("**/ui/user?**")
    await page.click("nav >> text=Keys")
    await page.fill("#f-user", "ada")
    await page.fill("#f-name", "laptop")
    await page.click("text=Create key")
    secret = await page.input_value("#secret")
    assert secret.startswith("gwk_")
    await page.click("button[data-copy]")
    await page.wait_for_selector("text=Copied.")
    assert await page.evaluate("navigator.clipboard.readText()") == secret
    key_id = (await page.text_content("section.secret a")) or ""
    await page.goto(base + "/ui/keys")
    assert secret not in await page.content()
    # A budget, then a chat request moves its bar.
    await page.click("nav >> text=Budgets")
    await page.select_option("#f-scope", "team")
    await page.fill("#f-subject", "research")
    await page.fill("#f-limit", "1")
    await page.click("text=Save budget")
    await page.wait_for_selector("text=Budget saved.")
    assert "0 spent, 0 held of 1" in await page.content()
    for _ in range(3):
        assert (await w.chat(secret, messages=2)).status == 200
    await page.reload()
    assert "0.6 spent, 0 held of 1" in await page.content()
    # Block the key: the next chat request gets 401. Unblock, then rotate it with a grace.
    await page.goto(f"{base}/ui/keys/{key_id}")
    await page.click("button:has-text('Block')")
    await page.wait_for_selector("text=Key blocked")
    assert (await w.chat(secret)).status == 401
    await page.click("button:has-text('Unblock')")
    await page.fill("#f-grace", "1h")
    await page.click("text=Rotate key")
    rotated = await page.input_value("#secret")
    assert rotated.startswith("gwk_") and rotated != secret
    assert (await w.chat(rotated)).status == 200
    # The ledger, paged; a row adjusted.
    await page.goto(base + "/ui/ledger?user=ada")
    await page.click("table a.mono >> nth=0")
    await page.fill("#f-credits", "-0.05")
    await page.fill("#f-reason", "refund: bad answer")
    await page.click("text=Record adjustment")
    await page.wait_for_selector("text=Adjustment recorded.")
    # A report's CSV, downloaded.
    await page.goto(base + "/ui/reports?group_by=team&group_by=model")
    async with page.expect_download() as info:
        await page.click("text=Download CSV")
    download = await info.value
    csv = Path(await download.path()).read_text()
    assert csv.splitlines()[0].startswith("team,model,requests,messages,credits")
    assert csv.splitlines()[1].startswith("research,openai/gpt-oss-20b,4,7,")
    # Every change is on the audit page, made by the console.
    await page.goto(base + "/ui/audit")
    audit = await page.content()
    for action in (
        "team.create",
        "user.create",
        "key.create",
        "budget.set",
        "key.block",
        "key.unblock",
        "key.rotate",
        "ledger.adjust",
    ):
        assert action in audit, action
    assert "console 127.0.0.1" in audit and secret not in audit and rotated not in audit
    # Tables sort: the ledger by credits, with a button in the header.
    await page.goto(base + "/ui/ledger")
    await page.click("th >> text=Credits")
    assert await page.get_attribute("th:has-text('Credits')", "aria-sort") == "ascending"
    # Every page: screenshot, no serious or critical accessibility violation, no console error.
    for name, path in PAGES:
        await page.goto(base + path)
        await _shot(page, name)
        assert await _axe(page) == [], name
    assert watched.errors == []


async def test_keyboard_and_phone_width(admin_world: World, browser: Browser) -> None:
    w = admin_world
    await w.team("research")
    await w.user("ada", "research")
    await w.key("ada")
    base = str(w.client.make_url("")).rstrip("/")
    watched = await _open(browser, base, width=390)
    page = watched.page
    # Keyboard only: Tab reaches the skip link, then the main navigation; Enter follows a link.
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.className") == "skip"
    for _ in range(3):
        await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.closest('nav#nav') !== null")
    assert await page.evaluate("document.activeElement.textContent") == "Teams & users"
    await page.keyboard.press("Enter")
    await page.wait_for_url(base + "/ui/teams")
    # Phone width: no page scrolls sideways (wide tables scroll inside their own box).
    for name, path in PAGES:
        await page.goto(base + path)
        overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, (name, overflow)
        await _shot(page, f"{name}-phone")
    signin = await browser.new_page()
    await signin.goto(base + "/ui/signin")
    assert await _axe(signin) == []
    await signin.close()
    assert watched.errors == []
