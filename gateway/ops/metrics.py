"""Prometheus metrics of the gateway, on an injected registry (names fixed by the contract, section 7).

The metrics every request touches are this module's own: plain numbers the event loop adds to, read
when scraped. prometheus_client's take a lock and run a few Python checks on each update (and a
histogram looks for its bucket one by one): nine updates a request came to 5% of the gateway's
instructions (callgrind). Both kinds are exposed alike, `_created` series included. The rest (budget
gauges, expired holds) change a few times a second and stay prometheus_client's.

Under `gateway serve --workers N` each worker process has its own; `snapshot` turns a registry's
samples into JSON-ready data, `merge` adds several processes' up into one server's, and
`exposition` renders that for a scrape (gateway/workers.py moves them between processes).
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


class Count:
    """One series of a counter or gauge."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up; asked to add {amount}")
        self.value += amount


class Observations:
    """One series of a histogram: how many observations fell in each bucket, and their sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        # The first bucket whose upper bound is >= value (buckets are `le`, less or equal).
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


S = TypeVar("S", Count, Observations)
# How Prometheus writes a bucket's bound (`le`): "0.0005", "1.0", "+Inf".
_le: Callable[[float], str] = floatToGoString


class _Family(Collector, Generic[S]):
    """A metric only the event loop updates, with a series per combination of label values."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry):
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], S] = {}
        if not self.labelnames:
            self._series[()] = self._new()
        registry.register(self)

    def labels(self, *values: str, **named: str) -> S:
        """The series of these label values, given in order or by name (made on first use)."""
        if named:
            values = tuple(named[name] for name in self.labelnames)
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            series = self._series[values] = self._new()
        return series

    def _new(self) -> S:
        raise NotImplementedError

    def _metric(self) -> Metric:
        return Metric(
            self.name.removesuffix("_total") if self.kind == "counter" else self.name,
            self.documentation,
            self.kind,
        )

    def describe(self) -> list[Metric]:
        """The metric without samples: how the registry learns its names."""
        return [self._metric()]


class FastCounter(_Family[Count]):
    """A counter, exposed as prometheus_client's are (`_total`, and `_created` per series)."""

    kind = "counter"

    def _new(self) -> Count:
        return Count()

    def collect(self) -> Iterator[Metric]:
        counter = self._metric()
        for values, series in list(self._series.items()):
            labels = dict(zip(self.labelnames, values, strict=True))
            counter.add_sample(counter.name + "_total", labels, series.value)
            counter.add_sample(counter.name + "_created", labels, series.created)
        yield counter


class FastGauge(_Family[Count]):
    """A gauge without labels."""

    kind = "gauge"

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry):
        super().__init__(name, documentation, (), registry)

    def _new(self) -> Count:
        return Count()

    def inc(self, amount: float = 1.0) -> None:
        self._series[()].value += amount

    def dec(self, amount: float = 1.0) -> None:
        self._series[()].value -= amount

    def collect(self) -> Iterator[Metric]:
        gauge = self._metric()
        gauge.add_sample(self.name, {}, self._series[()].value)
        yield gauge


class ReadGauge(Collector):
    """A gauge without labels whose value is read, when scraped, from `source` (0 until one is set)."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry):
        self.name = name
        self.documentation = documentation
        self.source: Callable[[], float] | None = None
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        gauge = Metric(self.name, self.documentation, "gauge")
        gauge.add_sample(self.name, {}, self.source() if self.source is not None else 0)
        yield gauge

    def describe(self) -> list[Metric]:
        return [Metric(self.name, self.documentation, "gauge")]


class FastHistogram(_Family[Observations]):
    """A histogram, exposed as prometheus_client's are (`_bucket`, `_count`, `_sum`, `_created`)."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ):
        self.bounds = tuple(sorted({*buckets, math.inf}))
        super().__init__(name, documentation, labelnames, registry)

    def _new(self) -> Observations:
        return Observations(self.bounds)

    def observe(self, value: float) -> None:
        """Observe on the series of a histogram without labels."""
        self._series[()].observe(value)

    def collect(self) -> Iterator[Metric]:
        histogram = self._metric()
        for values, series in list(self._series.items()):
            labels = dict(zip(self.labelnames, values, strict=True))
            cumulative = list(itertools.accumulate(series.counts))
            for bound, count in zip(self.bounds, cumulative, strict=True):
                histogram.add_sample(self.name + "_bucket", {**labels, "le": _le(bound)}, count)
            histogram.add_sample(self.name + "_count", labels, cumulative[-1])
            histogram.add_sample(self.name + "_sum", labels, series.sum)
            histogram.add_sample(self.name + "_created", labels, series.created)
        yield histogram


class Metrics:
    """Every metric the gateway exports, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = FastCounter(
            "gateway_requests_total", "Chat requests by model and outcome.", ["model", "outcome"], r
        )
        self.credits_charged = FastCounter(
            "gateway_credits_charged_total", "Credits charged.", ["model", "team"], r
        )
        self.messages_charged = FastCounter(
            "gateway_messages_charged_total", "Messages charged.", ["model", "team"], r
        )
        self.tokens = FastCounter(
            "gateway_tokens_total", "Tokens reported by upstream.", ["model", "kind"], r
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
        self.request_duration = FastHistogram(
            "gateway_request_duration_seconds",
            "Time from request received to response finished.",
            ["model", "stream"],
            LATENCY_BUCKETS,
            r,
        )
        self.upstream_first_byte = FastHistogram(
            "gateway_upstream_first_byte_seconds",
            "Time from forwarding to upstream response headers.",
            ["model"],
            LATENCY_BUCKETS,
            r,
        )
        self.overhead = FastHistogram(
            "gateway_overhead_seconds",
            "Time spent in the gateway itself, upstream wait excluded.",
            [],
            OVERHEAD_BUCKETS,
            r,
        )
        self.inflight = FastGauge("gateway_inflight_requests", "Chat requests in flight.", r)
        self.upstream_connections = ReadGauge(
            "gateway_upstream_connections", "Connections to upstream open (in use or idle in the pool).", r
        )
        self.holds_expired = Counter(
            "gateway_holds_expired_total",
            "Holds released by expiry (a sign of crashed processes).",
            registry=r,
        )
        # Alerts (contract section 9; gateway/ops/webhooks.py).
        self.alerts_emitted = Counter(
            "gateway_alerts_emitted_total",
            "Budget alert events emitted, counted once by the process that dispatched them.",
            ["scope", "threshold"],
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "gateway_webhook_deliveries_total",
            "Webhook delivery attempts by outcome (delivered, failed: to be retried, gave_up).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("delivered", "failed", "gave_up"):
            self.webhook_deliveries.labels(outcome)
        self.webhook_pending = Gauge(
            "gateway_webhook_pending", "Webhook deliveries not yet made nor given up.", registry=r
        )
        # Rate and concurrency limits (contract section 13; gateway/core/ratelimits.py).
        self.rate_limited = FastCounter(
            "gateway_rate_limited_total",
            "Chat requests refused 429 by a rate or concurrency limit, by its scope and kind.",
            ["scope", "kind"],
            r,
        )
        self.upstream_rate_limited = FastCounter(
            "gateway_upstream_rate_limited_total",
            "Chat requests refused 429 by the global upstream caps (source gateway), or answered "
            "429 by upstream itself and relayed (source upstream).",
            ["source"],
            r,
        )


# ------------------------------------------------------------------ across worker processes

# A registry's samples as JSON-ready data: per metric family its name, documentation, type and
# samples as [sample name, labels, value].
Snapshot = list[dict[str, Any]]

# Gauges that every process would read alike from the database: a server shows them once.
SHOWN_ONCE = frozenset(
    {
        "gateway_budget_limit_credits",
        "gateway_budget_spent_credits",
        "gateway_budget_remaining_credits",
        "gateway_webhook_pending",
    }
)
# Families whose samples count what happened: they outlive the process that counted them.
_ADDED = ("counter", "histogram", "summary")


def snapshot(registry: CollectorRegistry) -> Snapshot:
    """Every sample of `registry`, to be merged with other processes' (see `merge`)."""
    return [
        {
            "name": family.name,
            "documentation": family.documentation,
            "type": family.type,
            "samples": [[s.name, s.labels, s.value] for s in family.samples],
        }
        for family in registry.collect()
    ]


def totals(snap: Snapshot) -> Snapshot:
    """What of a process's snapshot still counts once it has stopped: its counters and histograms.

    Its gauges (requests in flight, budgets) said what was true while it ran.
    """
    return [family for family in snap if family["type"] in _ADDED]


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Several processes' snapshots as one server's.

    Counters and histograms are added up, series by series (`_created`: the earliest); so are
    gauges (requests in flight), except those in SHOWN_ONCE and of other types, taken from the
    first snapshot that has samples of them.
    """
    merged: dict[str, dict[str, Any]] = {}
    # Per family: (sample name, labels) -> its [name, labels, value] in the merged family.
    index: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[Any]]] = {}
    for snap in snapshots:
        for family in snap:
            name = family["name"]
            into = merged.get(name)
            if into is None:
                into = merged[name] = {**family, "samples": []}
                index[name] = {}
            elif family["type"] not in (*_ADDED, "gauge") or name in SHOWN_ONCE:
                if into["samples"]:
                    continue
            seen = index[name]
            for sample_name, labels, value in family["samples"]:
                key = (sample_name, tuple(sorted(labels.items())))
                sample = seen.get(key)
                if sample is None:
                    seen[key] = sample = [sample_name, labels, value]
                    into["samples"].append(sample)
                elif sample_name.endswith("_created"):
                    sample[2] = min(sample[2], value)
                else:
                    sample[2] += value
    return list(merged.values())


class _Fixed(Collector):
    """A merged snapshot, collected as a registry's metrics are."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        for family in self.snap:
            metric = Metric(family["name"], family["documentation"], family["type"])
            for name, labels, value in family["samples"]:
                metric.add_sample(name, labels, value)
            yield metric


def exposition(snap: Snapshot) -> bytes:
    """A (merged) snapshot in Prometheus's text format, as `generate_latest` renders a registry."""
    return generate_latest(_Fixed(snap))
