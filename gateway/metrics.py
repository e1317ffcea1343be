"""Prometheus metrics of the gateway, on an injected registry (names fixed by the contract, section 7).

The metrics every request touches are this module's own: plain numbers the event loop adds to, read
when scraped. prometheus_client's take a lock and run a few Python checks on each update (and a
histogram looks for its bucket one by one): nine updates a request came to 5% of the gateway's
instructions (callgrind). Both kinds are exposed alike, `_created` series included. The rest (budget
gauges, expired holds) change a few times a second and stay prometheus_client's.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge
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
        self.holds_expired = Counter(
            "gateway_holds_expired_total",
            "Holds released by expiry (a sign of crashed processes).",
            registry=r,
        )
