"""Billing reports: a group_by picker and a date range, a table and a chart, and the CSV that
`gateway report --format csv` prints for the same query (the same function renders both)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.console import charts
from gateway.console.render import filters, form_errors, page, read
from gateway.errors import GatewayError
from gateway.ops import reports
from gateway.web.state import SETTINGS

CHART_ROWS = 25


def _query(request: web.Request) -> tuple[dict[str, str], reports.ReportQuery]:
    wanted = filters(request, ("from", "to"))
    picked = [g for g in request.query.getall("group_by", []) if g]
    if len(picked) == 1 and "," in picked[0]:
        picked = picked[0].split(",")
    wanted["group_by"] = ",".join(picked)
    # In the gateway's zone, as `gateway report` (whose CSV this page's equals).
    zone = request.config_dict[SETTINGS].timezone
    return wanted, reports.parse_query(wanted.get("from"), wanted.get("to"), wanted["group_by"] or None, zone)


async def reports_page(request: web.Request) -> web.Response:
    """GET /ui/reports?group_by=team&group_by=model&from=&to=."""
    errors: dict[str, str] = {}
    report = None
    wanted: dict[str, Any] = {"group_by": ""}
    try:
        wanted, query = _query(request)
        if request.query:
            report = await read(request, reports.usage_report, query)
    except GatewayError as exc:
        errors = form_errors(exc, "group_by")
        wanted = {
            **filters(request, ("from", "to")),
            "group_by": ",".join(request.query.getall("group_by", [])),
        }
    chart = None
    if report is not None and report.rows:
        credits_at = len(report.group_by) + reports.SUMS.index("credits")
        ranked = sorted(report.text_rows(), key=lambda cells: -float(cells[credits_at]))[:CHART_ROWS]
        width = len(report.group_by)
        chart = charts.bars(
            [
                (" · ".join(c or "(none)" for c in cells[:width]) or "total", float(cells[credits_at]))
                for cells in ranked
            ]
        )
    return page(
        request,
        "reports.html",
        "reports",
        status=400 if errors else 200,
        report=report,
        chart=chart,
        groups=reports.GROUPS,
        picked=[g for g in str(wanted.get("group_by", "")).split(",") if g],
        wanted=wanted,
        csv_link="/ui/reports.csv?" + request.query_string if report is not None else None,
        errors=errors,
    )


async def report_csv(request: web.Request) -> web.Response:
    """GET /ui/reports.csv?...: byte for byte what `gateway report --format csv` prints."""
    try:
        _, query = _query(request)
    except GatewayError as exc:
        return web.Response(status=400, text=exc.message)
    report = await read(request, reports.usage_report, query)
    # The CLI prints `csv("\n")` without its last newline, and print() adds one back.
    body = report.csv("\n").rstrip("\n") + "\n"
    return web.Response(
        text=body,
        content_type="text/csv",
        charset="utf-8",
        headers={"Content-Disposition": 'attachment; filename="usage.csv"'},
    )
