"""Prometheus metrics of the gateway, on an injected registry (names fixed by the contract, section 7)."""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """Every metric the gateway exports, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests_total", "Chat requests by model and outcome.", ["model", "outcome"], registry=r
        )
        self.credits_charged = Counter(
            "gateway_credits_charged_total", "Credits charged.", ["model", "team"], registry=r
        )
        self.messages_charged = Counter(
            "gateway_messages_charged_total", "Messages charged.", ["model", "team"], registry=r
        )
        self.tokens = Counter(
            "gateway_tokens_total", "Tokens reported by upstream.", ["model", "kind"], registry=r
        )
        labels = ["scope", "subject", "period"]
        self.budget_limit = Gauge("gateway_budget_limit_credits", "Budget limit.", labels, registry=r)
        self.budget_spent = Gauge(
            "gateway_budget_spent_credits",
            "Credits spent in the budget's current window.",
            labels,
            registry=r,
        )
        self.budget_remaining = Gauge(
            "gateway_budget_remaining_credits",
            "Credits left in the budget's current window (limit - spent - held).",
            labels,
            registry=r,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from request received to response finished.",
            ["model", "stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_first_byte = Histogram(
            "gateway_upstream_first_byte_seconds",
            "Time from forwarding to upstream response headers.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "Time spent in the gateway itself, upstream wait excluded.",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge("gateway_inflight_requests", "Chat requests in flight.", registry=r)
        self.holds_expired = Counter(
            "gateway_holds_expired_total",
            "Holds released by expiry (a sign of crashed processes).",
            registry=r,
        )


@functools.lru_cache(maxsize=4096)
def child(metric: MetricWrapperBase, *values: str) -> Any:
    """`metric.labels(*values)`, remembered: the lookup, with its lock and checks, costs more than
    the increment on the hot path. Only for metrics whose children are never removed."""
    return metric.labels(*values)
