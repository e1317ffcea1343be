from tests.console_helpers import sign_in
async def test_smoke(admin_world):
    c = admin_world.client
    csrf = await sign_in(c)
    for path in ["/ui/", "/ui/teams", "/ui/team?name=eng", "/ui/user?name=alice", "/ui/keys", "/ui/budgets", "/ui/ledger", "/ui/reports", "/ui/reports?group_by=team", "/ui/alerts", "/ui/audit"]:
        r = await c.get(path)
        t = await r.text()
        assert r.status == 200, (path, t[:3000])
