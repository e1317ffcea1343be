"""The console's routes, page by page (paths relative to /ui)."""

from __future__ import annotations

from aiohttp import web

from gateway.console import (
    alerts,
    audit_page,
    budgets,
    keys,
    ledger_page,
    overview,
    reports_page,
    signin,
    teams,
)


def add_routes(router: web.UrlDispatcher) -> None:
    """Register every page and form of the console."""
    router.add_get("/signin", signin.signin_form)
    router.add_post("/signin", signin.signin)
    router.add_post("/signout", signin.signout)
    router.add_get("/", overview.overview)
    router.add_get("/teams", teams.teams_page)
    router.add_post("/teams", teams.create_team)
    router.add_post("/users", teams.create_user)
    router.add_get("/team", teams.team_page)
    router.add_get("/user", teams.user_page)
    router.add_post("/models", teams.set_models)
    router.add_get("/keys", keys.keys_page)
    router.add_post("/keys", keys.create_key)
    router.add_get("/keys/{id}", keys.key_page)
    router.add_post("/keys/{id}/{action}", keys.key_action)
    router.add_get("/budgets", budgets.budgets_page)
    router.add_post("/budgets", budgets.set_budget)
    router.add_post("/budgets/delete", budgets.delete_budget)
    router.add_get("/ledger", ledger_page.ledger_page)
    router.add_get("/ledger/{request_id}", ledger_page.entry_page)
    router.add_post("/ledger/{request_id}/adjust", ledger_page.adjust)
    router.add_get("/reports", reports_page.reports_page)
    router.add_get("/reports.csv", reports_page.report_csv)
    router.add_get("/alerts", alerts.alerts_page)
    router.add_post("/alerts/test", alerts.test_webhooks)
    router.add_get("/audit", audit_page.audit_page)
