"""The Grafana dashboards and Prometheus alerts only use metrics the gateway really exports.

No server: the dashboards' and rules' PromQL is checked against the text exposition of a
`gateway.ops.metrics.Metrics` registry in which every labelled metric has been used once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from gateway.ops.metrics import Metrics

GRAFANA = Path(__file__).resolve().parents[1] / "grafana"
DASHBOARDS = {
    "spend": GRAFANA / "dashboards" / "spend.json",
    "operations": GRAFANA / "dashboards" / "operations.json",
}
ALERTS = GRAFANA / "alerts.yml"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
README = GRAFANA / "README.md"

METRIC_NAME = re.compile(r"\bgateway_[A-Za-z0-9_:]*")
SELECTOR = re.compile(r"\b(gateway_[A-Za-z0-9_:]*)\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
LABEL_VALUES = re.compile(r"label_values\(\s*(gateway_[A-Za-z0-9_:]*)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)")
SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s")
SAMPLE_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="')
PANEL_TYPES = {"timeseries", "stat", "bargauge", "table"}
UNITS = {"short", "s", "percentunit"}
EXPECTED_ALERTS = {
    "GatewayBudgetNearLimit",
    "GatewayBudgetExhausted",
    "GatewayUpstreamErrorRatioHigh",
    "GatewayLedgerUnavailable",
    "GatewayHoldsExpiring",
    "GatewayRateLimitedSustained",
    "GatewayWebhookFailing",
    "GatewayWebhookGaveUp",
}


# ------------------------------------------------------------------ what the gateway exports


@cache
def exported() -> dict[str, frozenset[str]]:
    """Every sample name in the exposition text, with the label names it carries."""
    m = Metrics()
    m.requests.labels(model="m", outcome="charged").inc()
    m.credits_charged.labels(model="m", team="t").inc(0.5)
    m.messages_charged.labels(model="m", team="t").inc(2)
    m.tokens.labels(model="m", kind="prompt").inc(10)
    for gauge in (m.budget_limit, m.budget_spent, m.budget_remaining):
        gauge.labels(scope="team", subject="t", period="daily").set(1)
    m.request_duration.labels(model="m", stream="false").observe(0.1)
    m.upstream_first_byte.labels(model="m").observe(0.05)
    m.overhead.observe(0.001)
    m.inflight.inc()
    m.holds_expired.inc()
    m.alerts_emitted.labels(scope="team", threshold="80").inc()
    m.rate_limited.labels(scope="key", kind="requests").inc()
    m.upstream_rate_limited.labels(source="upstream").inc()

    labels: dict[str, set[str]] = {}
    for line in generate_latest(m.registry).decode().splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, line
        labels.setdefault(match[1], set()).update(SAMPLE_LABEL.findall(match[2] or ""))
    return {name: frozenset(names) for name, names in labels.items()}


# ------------------------------------------------------------------ what the dashboards use


@cache
def dashboard(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARDS[name].read_text(encoding="utf-8"))
    return data


@cache
def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def panels(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in container.get("panels", []):
        yield panel
        yield from panels(panel)


def leaf_panels(name: str) -> list[dict[str, Any]]:
    return [p for p in panels(dashboard(name)) if p.get("type") != "row"]


def variable_queries(name: str) -> list[str]:
    out = []
    for var in dashboard(name)["templating"]["list"]:
        query = var.get("query")
        out.append(query["query"] if isinstance(query, dict) else query)
    return out


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, template variable query and alert rule."""
    out = []
    for name in DASHBOARDS:
        for panel in leaf_panels(name):
            for target in panel.get("targets", []):
                out.append((f"{name}: {panel['title']} [{target['refId']}]", target["expr"]))
        for query in variable_queries(name):
            out.append((f"{name}: variable", query))
    for rule in rules():
        out.append((f"alerts.yml: {rule['alert']}", rule["expr"]))
    return out


EXPRESSIONS = expressions()
EXPR_IDS = [where for where, _ in EXPRESSIONS]


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def brackets_balanced(expr: str) -> bool:
    """(), [] and {} nest properly, ignoring anything inside string literals."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    quote = ""
    escaped = False
    for ch in expr:
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack and not quote


# ------------------------------------------------------------------ the checker can fail


def test_checks_catch_mistakes() -> None:
    names = exported()
    assert "gateway_request_duration_seconds_bucket" in names
    assert "gateway_credits_charged_total" in names
    assert "gateway_request_duration_seconds" not in names  # only its _bucket/_sum/_count series
    assert metric_names('rate(gateway_request_duration_second_bucket{model="x"}[5m])') == {
        "gateway_request_duration_second_bucket"
    }
    assert not metric_names("rate(gateway_request_duration_second_bucket[5m])") <= names.keys()
    assert not brackets_balanced("sum(rate(x[5m])")
    assert not brackets_balanced("sum(rate(x[5m)))")
    assert brackets_balanced('sum(rate(x{a=~"(b"}[5m]))')


# ------------------------------------------------------------------ expressions


def test_every_dashboard_and_rule_has_expressions() -> None:
    for name in DASHBOARDS:
        assert any(where.startswith(f"{name}:") for where in EXPR_IDS), name
    assert len(rules()) >= len(EXPECTED_ALERTS)


@pytest.mark.parametrize("expr", [e for _, e in EXPRESSIONS], ids=EXPR_IDS)
def test_expression_uses_only_exported_metrics(expr: str) -> None:
    used = metric_names(expr)
    assert used, f"no gateway_ metric in {expr!r}"
    unknown = used - exported().keys()
    assert not unknown, f"not exported by gateway.ops.metrics: {sorted(unknown)}"


@pytest.mark.parametrize("expr", [e for _, e in EXPRESSIONS], ids=EXPR_IDS)
def test_expression_brackets_are_balanced(expr: str) -> None:
    assert expr.count("(") == expr.count(")")
    assert brackets_balanced(expr), expr


@pytest.mark.parametrize("expr", [e for _, e in EXPRESSIONS], ids=EXPR_IDS)
def test_expression_labels_exist_on_their_metric(expr: str) -> None:
    """Label matchers in `metric{...}` and `label_values(metric, label)` name real labels."""
    names = exported()
    for metric, matchers in SELECTOR.findall(expr):
        for label in MATCHER_LABEL.findall(re.sub(r'"(?:[^"\\]|\\.)*"', '""', matchers)):
            assert label in names.get(metric, ()), f"{metric} has no label {label!r}"
    for metric, label in LABEL_VALUES.findall(expr):
        assert label in names.get(metric, ()), f"{metric} has no label {label!r}"


# ------------------------------------------------------------------ dashboards


@pytest.mark.parametrize("name", DASHBOARDS)
def test_dashboard_model(name: str) -> None:
    d = dashboard(name)
    assert d["uid"] == f"gateway-{name}"
    assert d["title"] == f"Gateway — {name.capitalize()}"
    assert d["schemaVersion"] == 39
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


@pytest.mark.parametrize("name", DASHBOARDS)
def test_every_panel_is_described_and_typed(name: str) -> None:
    for panel in leaf_panels(name):
        title = panel.get("title", "")
        assert title.strip(), panel.get("id")
        assert isinstance(panel.get("description"), str) and panel["description"].strip(), title
        assert panel["type"] in PANEL_TYPES, title
        assert panel["fieldConfig"]["defaults"]["unit"] in UNITS, title
        assert panel.get("targets"), title
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), title


def test_spend_dashboard_has_team_and_model_variables() -> None:
    variables = {v["name"]: v for v in dashboard("spend")["templating"]["list"]}
    for name in ("team", "model"):
        var = variables[name]
        assert var["type"] == "query"
        assert var["query"]["query"] == f"label_values(gateway_credits_charged_total, {name})"
        assert var["multi"] is True
        assert var["includeAll"] is True
        assert var["allValue"] == ".*"


@pytest.mark.parametrize("name", DASHBOARDS)
def test_used_variables_are_defined(name: str) -> None:
    defined = {v["name"] for v in dashboard(name)["templating"]["list"]}
    for panel in leaf_panels(name):
        for target in panel["targets"]:
            used = set(re.findall(r"\$(?!__)([A-Za-z_]\w*)", target["expr"]))
            assert used <= defined, f"{panel['title']}: undefined {sorted(used - defined)}"


@pytest.mark.parametrize("name", DASHBOARDS)
def test_panels_use_the_provisioned_datasource(name: str) -> None:
    doc = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))
    (source,) = doc["datasources"]
    assert source["type"] == "prometheus"
    uid = source["uid"]
    for panel in leaf_panels(name):
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == uid, panel["title"]
    for var in dashboard(name)["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"]["uid"] == uid, var["name"]


# ------------------------------------------------------------------ alerts


def test_alert_rules_are_complete() -> None:
    names = set()
    for rule in rules():
        assert rule.get("alert"), rule
        assert isinstance(rule.get("expr"), str) and rule["expr"].strip(), rule["alert"]
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, rule["alert"]
        assert rule.get("annotations", {}).get("summary", "").strip(), rule["alert"]
        assert rule["annotations"].get("description", "").strip(), rule["alert"]
        names.add(rule["alert"])
    assert names == EXPECTED_ALERTS


def divisors(expr: str) -> list[str]:
    """The right operand of every `/`: an optional `agg by (...)` and one parenthesized group."""
    out = []
    for slash in re.finditer(r"/", expr):
        rest = expr[slash.end() :]
        head = re.match(r"\s*(?:[a-z_]+\s*(?:(?:by|without)\s*\([^)]*\)\s*)?)?\(", rest)
        assert head, f"divisor is not parenthesized: {rest[:60]!r}"
        depth, start = 0, head.end() - 1
        for i in range(start, len(rest)):
            depth += {"(": 1, ")": -1}.get(rest[i], 0)
            if depth == 0:
                out.append(rest[start : i + 1])
                break
    return out


@pytest.mark.parametrize("expr", [e for _, e in EXPRESSIONS], ids=EXPR_IDS)
def test_divisions_guard_against_zero(expr: str) -> None:
    """Every ratio filters its divisor with `> 0`, so an empty or zero denominator gives no result."""
    for divisor in divisors(expr):
        assert re.search(r">\s*0\s*\)$", divisor), f"divisor without `> 0`: {divisor}"


# ------------------------------------------------------------------ docs


def test_readme_documents_every_panel_and_alert() -> None:
    readme = README.read_text(encoding="utf-8")
    for name in DASHBOARDS:
        for panel in leaf_panels(name):
            assert f"| {panel['title']} | {panel['description']} |" in readme, panel["title"]
    for alert in EXPECTED_ALERTS:
        assert f"| {alert} |" in readme, alert
