"""Pure: the shapes of the console's charts, drawn by the templates as inline SVG (no script).

`stacked_days` stacks each day's credits by series (teams) into bars; `bars` draws one horizontal
bar per row. Coordinates are in the SVG's own units (its viewBox), so the chart scales with the page.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

WIDTH, HEIGHT = 1000, 220
PAD_LEFT, PAD_BOTTOM, PAD_TOP = 56, 24, 8
MAX_SERIES = 8  # more teams than this are drawn together as "other"


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float
    series: int  # colour index; MAX_SERIES for "other"
    title: str


@dataclass(frozen=True)
class Chart:
    rects: list[Rect]
    legend: list[tuple[int, str]]
    ticks: list[tuple[float, str]]  # (y, label) of the value axis
    labels: list[tuple[float, str]]  # (x, label) of the day axis
    width: int = WIDTH
    height: int = HEIGHT


def _nice(top: float) -> float:
    """A round axis maximum at or above `top`."""
    if top <= 0:
        return 1.0
    magnitude = 10 ** (len(str(int(top))) - 1)
    for step in (1, 2, 2.5, 5, 10):
        if top <= step * magnitude:
            return float(step * magnitude)
    return float(10 * magnitude)


def _label(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 or value == 0 else f"{value:g}"


def stacked_days(days: list[str], values: dict[tuple[str, str], Decimal | float], names: list[str]) -> Chart:
    """Bars of credits per day (`days`, ISO dates), each stacked by series (`names`, largest first).

    `values` maps (series name, day) to credits; series past MAX_SERIES are summed as "other".
    """
    shown = names[:MAX_SERIES]
    index = {name: i for i, name in enumerate(shown)}
    per_day: dict[str, list[float]] = {day: [0.0] * (len(shown) + 1) for day in days}
    for (name, day), credits in values.items():
        if day in per_day:
            per_day[day][index.get(name, len(shown))] += float(credits)
    top = _nice(max((sum(v) for v in per_day.values()), default=0.0))
    plot_w, plot_h = WIDTH - PAD_LEFT, HEIGHT - PAD_BOTTOM - PAD_TOP
    slot = plot_w / max(len(days), 1)
    rects = []
    for i, day in enumerate(days):
        y = float(HEIGHT - PAD_BOTTOM)
        for series, credits in enumerate(per_day[day]):
            if credits <= 0:
                continue
            h = credits / top * plot_h
            y -= h
            name = shown[series] if series < len(shown) else "other"
            colour = series if series < len(shown) else MAX_SERIES
            rects.append(
                Rect(PAD_LEFT + i * slot + 1, y, max(slot - 2, 1), h, colour, f"{day} {name}: {credits:g}")
            )
    ticks = [(HEIGHT - PAD_BOTTOM - f * plot_h, _label(top * f)) for f in (0, 0.5, 1)]
    step = max(len(days) // 6, 1)
    labels = [(PAD_LEFT + i * slot + slot / 2, day[5:]) for i, day in enumerate(days) if i % step == 0]
    legend = [(i, name) for i, name in enumerate(shown)]
    if len(names) > len(shown):
        legend.append((MAX_SERIES, "other"))
    return Chart(rects, legend, ticks, labels)


@dataclass(frozen=True)
class Bar:
    label: str
    value: str
    y: float
    w: float


@dataclass(frozen=True)
class Bars:
    bars: list[Bar]
    width: int
    height: int
    label_width: int


def bars(rows: list[tuple[str, float]], width: int = WIDTH, row_h: int = 22, label_width: int = 220) -> Bars:
    """One horizontal bar per (label, value), longest value the full width."""
    top = max((v for _, v in rows), default=0.0) or 1.0
    span = width - label_width - 80
    out = [
        Bar(label[:40], f"{value:g}", i * row_h, max(value / top * span, 0.5 if value else 0))
        for i, (label, value) in enumerate(rows)
    ]
    return Bars(out, width, max(len(rows), 1) * row_h, label_width)
