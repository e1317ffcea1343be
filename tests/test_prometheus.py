"""A real Prometheus scrapes a live gateway: every dashboard query and alert rule evaluates, with data.

The stack, all on loopback and all stopped at the end: a migrated temp SQLite database set up with
the `gateway` CLI, `gateway fake-upstream`, `gateway serve`, and Prometheus with a generated config
scraping the gateway every second and loading `grafana/alerts.yml`. A bounded mix of requests
(plain, streamed, over budget, upstream errors, refused) runs through the gateway; then every
panel target (Grafana variables replaced), variable query and alert expression is evaluated through
Prometheus' HTTP API.

Needs the `prometheus` and `promtool` binaries (Debian/Ubuntu: `apt-get install prometheus`);
skipped without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .procs import free_port
from .test_dashboards import ALERTS, DASHBOARDS, leaf_panels, rules, variable_queries

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
SKIP_HINT = (
    "Prometheus is not installed: `apt-get install -y --no-install-recommends prometheus` "
    "(Debian/Ubuntu; provides `prometheus` and `promtool`) to run these tests"
)

# How Grafana would fill in the dashboards' variables ("All" is `.*`).
GRAFANA_VARIABLES = {"team": ".*", "model": ".*", "__rate_interval": "1m", "__range": "5m"}

# The load below exercises every panel; a new panel must be put in one of these two sets.
PANELS_WITH_DATA = {
    "operations": {
        "Requests per second",
        "Upstream error ratio (now)",
        "Latency p99 (now)",
        "In-flight requests (now)",
        "Request rate by outcome",
        "Upstream error ratio",
        "Request latency (p50 / p95 / p99)",
        "Gateway overhead (p50 / p99)",
        "Upstream time to first byte (p50 / p99)",
        "In-flight requests",
        "Expired holds per second",
        "Tokens per second by kind",
        # No webhook in this stack: deliveries are 0 (their series exist), pending 0, and the
        # budgets crossing 80 and 100 % are counted as alert events.
        "Webhook deliveries per second by outcome",
        "Alert events and pending deliveries",
    },
    "spend": {
        "Credits charged in range",
        "Messages charged in range",
        "Budget refusals in range",
        "Budgets at 80% or more",
        "Credits per second by team",
        "Credits per second by model",
        "Top teams by credits in range",
        "Top models by credits in range",
        "Budget used this window (spent / limit)",
        "Remaining budget",
        "Budgets",
        "Budget refusals per second by model",
        "Messages charged per second by model",
    },
}
# No limit in this stack (tests/test_rate_limits.py counts refusals): no series to show.
PANELS_WITHOUT_DATA: dict[str, set[str]] = {"operations": {"Rate-limit refusals per second"}, "spend": set()}
# Carol's budget ends 90% spent, Bob's 100%, and 20 of 246 admitted requests fail upstream.
ALERTS_FIRING = {"GatewayBudgetNearLimit", "GatewayBudgetExhausted", "GatewayUpstreamErrorRatioHigh"}
ALERTS_QUIET = {
    "GatewayLedgerUnavailable",
    "GatewayHoldsExpiring",
    "GatewayRateLimitedSustained",
    "GatewayWebhookFailing",
    "GatewayWebhookGaveUp",
}

OSS20, LITE, FLASH = "openai/gpt-oss-20b", "google/gemini-2.5-flash-lite", "google/gemini-2.5-flash"
LOAD_ROUNDS = 5  # spread over a few 1 s scrapes, so that rates are positive
LOAD_CONCURRENCY = 8
LOAD_TIMEOUT_SECONDS = 60
WAIT_SECONDS = 30


# ------------------------------------------------------------------ processes


@dataclass
class Process:
    """A child process with its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)

    def tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} (exit {self.popen.poll()}) ---\n" + "\n".join(text.splitlines()[-30:])


class Stack:
    """The processes of one test module, and what they print when something goes wrong."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory = directory
        self.env = env
        self.processes: list[Process] = []

    def start(self, name: str, argv: list[str]) -> Process:
        log = self.directory / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def gateway_cli(self, *args: str) -> str:
        """Run `python -m gateway ARGS` on the test database; its output."""
        done = subprocess.run(
            [sys.executable, "-m", "gateway", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"gateway {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.processes)

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = WAIT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for p in self.processes:
                assert p.popen.poll() is None, f"{p.name} exited while waiting for {what}\n{self.logs()}"
            with contextlib.suppress(OSError, ValueError, KeyError):
                if check():
                    return
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {timeout}s\n{self.logs()}")
            time.sleep(0.2)

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def prometheus_config(gateway_port: int) -> dict[str, Any]:
    """Scrape the gateway every second and load the alert rules (JSON is YAML)."""
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "gateway",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"127.0.0.1:{gateway_port}"]}],
            }
        ],
    }


# ------------------------------------------------------------------ Prometheus' HTTP API


@dataclass
class Prometheus:
    url: str

    def get(self, path: str, **params: str) -> dict[str, Any]:
        """A GET on the API; its JSON document, error answers included."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
        document: dict[str, Any] = json.loads(body)
        return document

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector; fails the test on any error or warning."""
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", f"{answer.get('errorType')}: {answer.get('error')}\n{expr}"
        assert not answer.get("warnings"), answer["warnings"]
        data = answer["data"]
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single value of a query, or None when it has no result."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None


def grafana(expr: str) -> str:
    """A panel's expression as Grafana sends it, with every variable filled in."""

    def fill(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr!r}"
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", fill, expr)


# ------------------------------------------------------------------ the load


@dataclass(frozen=True)
class Call:
    key: str
    model: str
    contents: tuple[str, ...]
    stream: bool = False


def load_plan(alice: str, bob: str, carol: str) -> tuple[list[Call], Counter[int]]:
    """A few hundred requests, shuffled; and the statuses they must get."""
    calls = (
        [Call(alice, OSS20, ("hello", "there"))] * 120
        + [Call(alice, LITE, ("hello",), stream=True)] * 60
        + [Call(alice, OSS20, ("fake:500",))] * 14
        + [Call(alice, OSS20, ("fake:500",), stream=True)] * 6
        + [Call(bob, FLASH, ("hello",))] * 30  # 1 credit each on a 1-credit budget
        + [Call(carol, OSS20, ("hello",))] * 45  # 4.5 credits of 5
        + [Call("gwk_not-a-key", OSS20, ("hello",))] * 10
        + [Call(alice, "nobody/none", ("hello",))] * 5
        + [Call(alice, OSS20, ())] * 5
    )
    random.Random(4).shuffle(calls)
    statuses = Counter({200: 120 + 60 + 1 + 45, 500: 20, 402: 29, 401: 10, 400: 10})
    return calls, statuses


async def drive(gateway: str, calls: list[Call]) -> Counter[int]:
    """Send `calls` in rounds about a second apart, a few at a time; the statuses answered."""
    statuses: Counter[int] = Counter()
    gate = asyncio.Semaphore(LOAD_CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=10)

    async def send(session: aiohttp.ClientSession, call: Call) -> None:
        body = {
            "model": call.model,
            "messages": [{"role": "user", "content": c} for c in call.contents],
            "stream": call.stream,
        }
        async with (
            gate,
            session.post(
                f"{gateway}/api/v1/chat", json=body, headers={"Authorization": f"Bearer {call.key}"}
            ) as resp,
        ):
            await resp.read()
            statuses[resp.status] += 1

    async with asyncio.timeout(LOAD_TIMEOUT_SECONDS), aiohttp.ClientSession(timeout=timeout) as session:
        size = math.ceil(len(calls) / LOAD_ROUNDS)
        for start in range(0, len(calls), size):
            began = time.monotonic()
            await asyncio.gather(*(send(session, call) for call in calls[start : start + size]))
            await asyncio.sleep(max(0.0, 1.1 - (time.monotonic() - began)))
    return statuses


# ------------------------------------------------------------------ the stack


@dataclass
class Live:
    prometheus: Prometheus
    sent: int


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """Gateway, fake upstream and Prometheus, after the load has been scraped."""
    if PROMETHEUS is None or PROMTOOL is None:
        pytest.skip(SKIP_HINT)
    directory = tmp_path_factory.mktemp("prometheus")
    upstream_port, gateway_port, prometheus_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_DATABASE_URL=f"sqlite+aiosqlite:///{directory / 'gateway.db'}",
        GATEWAY_UPSTREAM_URL=f"http://127.0.0.1:{upstream_port}/api/v1/chat",
        GATEWAY_HOST="127.0.0.1",
        GATEWAY_PORT=str(gateway_port),
        GATEWAY_LOG_LEVEL="WARNING",
    )
    stack = Stack(directory, env)
    try:
        stack.gateway_cli("db", "upgrade")
        stack.gateway_cli("teams", "create", "eng")
        stack.gateway_cli("users", "create", "alice", "--team", "eng")
        stack.gateway_cli("users", "create", "bob", "--team", "eng")
        stack.gateway_cli("users", "create", "carol")
        alice, bob, carol = (
            json.loads(stack.gateway_cli("keys", "create", user, "--json"))["key"]
            for user in ("alice", "bob", "carol")
        )
        stack.gateway_cli("budgets", "set", "team", "eng", "1000", "--period", "daily")
        stack.gateway_cli("budgets", "set", "user", "bob", "1", "--period", "daily")
        stack.gateway_cli("budgets", "set", "user", "carol", "5", "--period", "total")

        stack.start(
            "fake-upstream", [sys.executable, "-m", "gateway", "fake-upstream", "--port", str(upstream_port)]
        )
        stack.start("gateway", [sys.executable, "-m", "gateway", "serve", "--no-migrate"])
        gateway = f"http://127.0.0.1:{gateway_port}"
        stack.wait_for("gateway ready", lambda: http_status(f"{gateway}/readyz") == 200)
        stack.wait_for(
            "fake upstream listening",
            lambda: http_status(f"http://127.0.0.1:{upstream_port}/api/v1/chat") == 405,
        )

        config = directory / "prometheus.yml"
        config.write_text(json.dumps(prometheus_config(gateway_port), indent=2))
        check = subprocess.run(
            [PROMTOOL, "check", "config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        stack.start(
            "prometheus",
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
        )
        prometheus = Prometheus(f"http://127.0.0.1:{prometheus_port}")
        stack.wait_for("Prometheus ready", lambda: http_status(f"{prometheus.url}/-/ready") == 200)
        stack.wait_for("the gateway scraped", lambda: prometheus.value('up{job="gateway"}') == 1)

        calls, expected = load_plan(alice, bob, carol)
        statuses = asyncio.run(drive(gateway, calls))
        assert statuses == expected, stack.logs()

        # Every request counted and scraped; the budget gauges refreshed after the last settlement.
        stack.wait_for(
            "every request scraped", lambda: prometheus.value("sum(gateway_requests_total)") == len(calls)
        )
        stack.wait_for(
            "carol's spend scraped",
            lambda: prometheus.value('max(gateway_budget_spent_credits{subject="carol"})') == 4.5,
        )
        yield Live(prometheus, len(calls))
    finally:
        stack.stop()


# ------------------------------------------------------------------ tests


def panel_targets() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expression) of every panel target."""
    return [
        (name, panel["title"], target["expr"])
        for name in DASHBOARDS
        for panel in leaf_panels(name)
        for target in panel["targets"]
    ]


PANEL_TARGETS = panel_targets()
VARIABLES = [(name, query) for name in DASHBOARDS for query in variable_queries(name)]
ALERT_RULES = [(rule["alert"], rule["expr"]) for rule in rules()]


def test_promtool_accepts_the_alert_rules() -> None:
    if PROMTOOL is None:
        pytest.skip(SKIP_HINT)
    done = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_panel_is_expected_with_or_without_data() -> None:
    for name in DASHBOARDS:
        titles = {panel["title"] for panel in leaf_panels(name)}
        assert not PANELS_WITH_DATA[name] & PANELS_WITHOUT_DATA[name]
        assert titles == PANELS_WITH_DATA[name] | PANELS_WITHOUT_DATA[name], name
    assert {alert for alert, _ in ALERT_RULES} == ALERTS_FIRING | ALERTS_QUIET


def test_prometheus_scraped_the_gateway(live: Live) -> None:
    assert live.prometheus.value('up{job="gateway"}') == 1
    assert live.prometheus.value("sum(gateway_requests_total)") == live.sent
    assert live.prometheus.value('sum(gateway_requests_total{outcome="budget_exceeded"})') == 29
    assert live.prometheus.value('sum(gateway_credits_charged_total{team="eng"})') == pytest.approx(
        120 * 0.2 + 60 * 0.15 + 1
    )
    assert live.prometheus.value('sum(gateway_credits_charged_total{team=""})') == pytest.approx(4.5)
    budgets = {
        (r["metric"]["scope"], r["metric"]["subject"], r["metric"]["period"])
        for r in live.prometheus.query("gateway_budget_limit_credits")
    }
    assert budgets == {("team", "eng", "daily"), ("user", "bob", "daily"), ("user", "carol", "total")}


@pytest.mark.parametrize(
    ("name", "title", "expr"), PANEL_TARGETS, ids=[f"{name}: {title}" for name, title, _ in PANEL_TARGETS]
)
def test_panel_query(live: Live, name: str, title: str, expr: str) -> None:
    result = live.prometheus.query(grafana(expr))
    if title in PANELS_WITH_DATA[name]:
        assert result, f"no data for {title!r}: {grafana(expr)}"
        values = [float(sample["value"][1]) for sample in result]
        assert any(math.isfinite(v) for v in values), f"{title!r}: only {values}"


@pytest.mark.parametrize(("name", "query"), VARIABLES, ids=[f"{name}: {q}" for name, q in VARIABLES])
def test_variable_query(live: Live, name: str, query: str) -> None:
    match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
    assert match, query
    answer = live.prometheus.get(f"/api/v1/label/{match[2]}/values", **{"match[]": match[1]})
    assert answer["status"] == "success", answer
    assert answer["data"], f"{name}: {query} has no values"


@pytest.mark.parametrize(("alert", "expr"), ALERT_RULES, ids=[alert for alert, _ in ALERT_RULES])
def test_alert_expression(live: Live, alert: str, expr: str) -> None:
    result = live.prometheus.query(expr)
    if alert in ALERTS_FIRING:
        assert result, f"{alert} should fire after this load"
    else:
        assert result == [], f"{alert} should be quiet: {result}"


def test_prometheus_evaluates_the_rules(live: Live) -> None:
    """Prometheus loaded alerts.yml, evaluates every rule without error, and the expected ones are active."""

    def states() -> dict[str, tuple[str, str]]:
        groups = live.prometheus.get("/api/v1/rules", type="alert")["data"]["groups"]
        return {r["name"]: (r["health"], r["state"]) for g in groups for r in g["rules"]}

    def expected(now: dict[str, tuple[str, str]]) -> bool:
        return now.keys() == ALERTS_FIRING | ALERTS_QUIET and all(
            health == "ok" and (state != "inactive") == (alert in ALERTS_FIRING)
            for alert, (health, state) in now.items()
        )

    deadline = time.monotonic() + WAIT_SECONDS
    while not expected(now := states()):
        assert time.monotonic() < deadline, now
        time.sleep(0.5)
