"""Forward an admitted chat request and relay upstream's answer, with its credit headers."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from gateway.core.idempotency import Answer, Reservation
from gateway.core.metering import Admission, Settlement
from gateway.core.pricing import format_credits
from gateway.errors import GatewayError
from gateway.web.settle import PROGRESS, Progress, settle
from gateway.web.state import DEADLINES, METRICS, SETTINGS, UPSTREAM
from gateway.web.upstream import (
    SseUsageScanner,
    end_stream,
    open_upstream,
    read_upstream_body,
    relay_stream,
    relayed_headers,
    upstream_headers,
    usage_from_body,
)

log = logging.getLogger(__name__)

# An SSE comment (ignored by clients' parsers, seen by people reading the stream).
EXPIRED_NOTE = (
    b": x-credits-charged 0 (this request's hold expired before it settled, so it was not charged)\n\n"
)


def credit_headers(admission: Admission, charged: bool) -> dict[str, str]:
    """X-Request-Id, X-Credits-Charged and (when a budget applies) X-Credits-Remaining after this request."""
    charge = admission.charge
    headers = {
        "X-Request-Id": charge.request_id,
        "X-Credits-Charged": format_credits(charge.credits if charged else 0),
    }
    if admission.remaining is not None:
        # The admission's figure counts this request's hold; a request not charged gives it back.
        remaining = admission.remaining + (0 if charged else charge.credits)
        headers["X-Credits-Remaining"] = format_credits(max(remaining, 0))
    if admission.rate_headers is not None:
        headers.update(admission.rate_headers)
    return headers


async def forward(
    request: web.Request,
    admission: Admission,
    body: bytes,
    started: float,
    reservation: Reservation | None,
) -> web.StreamResponse:
    """Forward an admitted request and relay the answer; settle in `finally`, whatever happens."""
    forwarded_at = time.perf_counter()
    progress = Progress(Settlement("upstream_unavailable"), started, forwarded_at, forwarded_at, reservation)
    request[PROGRESS] = progress
    try:
        response = await _exchange(request, admission, body, progress)
    except GatewayError as exc:
        progress.upstream_done = time.perf_counter()
        if exc.outcome in ("upstream_timeout", "upstream_unavailable"):
            progress.settlement = Settlement(exc.outcome, progress.settlement.upstream_status)
        exc.headers = credit_headers(admission, charged=False)
        raise
    finally:
        if not progress.settled:
            await settle(request.app, admission, progress)
    if progress.expired and not response.prepared:
        # Not sent yet: the headers say what the ledger says.
        response.headers.update(credit_headers(admission, charged=False))
    return response


async def _exchange(
    request: web.Request, admission: Admission, body: bytes, progress: Progress
) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    charge = admission.charge
    api_key = str(settings.upstream_api_key) if settings.upstream_api_key else None
    forwarded_at = progress.forwarded_at
    upstream = await open_upstream(
        app[UPSTREAM],
        app[DEADLINES],
        settings.upstream_url,
        body,
        upstream_headers(request.headers, api_key),
        settings.upstream_timeout_seconds,
    )
    try:
        app[METRICS].upstream_first_byte.labels(charge.model).observe(time.perf_counter() - forwarded_at)
        status = upstream.status
        ok = 200 <= status < 300
        if status == 429:
            # Upstream's own rate limit: relayed with its Retry-After, not charged (not 2xx).
            app[METRICS].upstream_rate_limited.labels("upstream").inc()
        headers = relayed_headers(upstream)
        headers.update(credit_headers(admission, charged=ok))
        if ok and charge.stream:
            # Charged from here on: upstream has answered 2xx, whatever becomes of the stream.
            progress.settlement = Settlement("charged", status)
            response = web.StreamResponse(status=status, headers=headers)
            try:
                await response.prepare(request)
            except (ConnectionError, RuntimeError):
                progress.upstream_done = time.perf_counter()
                return response
            scanner = SseUsageScanner()
            result = await relay_stream(
                upstream,
                response,
                request.transport,
                scanner,
                settings.stream_idle_timeout_seconds,
                settings.client_read_timeout_seconds,
            )
            if result.client_gone and request.transport is not None:
                # Close at once: a client that stopped reading would keep a closing socket open.
                request.transport.abort()
            progress.upstream_done = result.upstream_done_at
            usage = scanner.usage
            progress.settlement = Settlement(
                "charged", status, usage.prompt_tokens, usage.completion_tokens, usage.total_tokens
            )
            progress.answer = Answer(status, headers.get("Content-Type"), None)
            # Settle before the end of the stream, so a client that has read it all sees its ledger row.
            await settle(app, admission, progress)
            if not result.client_gone:
                if progress.expired:
                    # The headers went out saying charged; the stream's last line says otherwise.
                    await _write_quietly(response, EXPIRED_NOTE)
                await end_stream(response)
            return response
        progress.settlement = Settlement("upstream_unavailable", status)
        content = await read_upstream_body(upstream, settings.stream_idle_timeout_seconds)
        progress.upstream_done = time.perf_counter()
        if ok:
            usage = usage_from_body(content)
            progress.settlement = Settlement(
                "charged", status, usage.prompt_tokens, usage.completion_tokens, usage.total_tokens
            )
            progress.answer = Answer(status, headers.get("Content-Type"), content)
        else:
            progress.settlement = Settlement("upstream_error", status)
        return web.Response(body=content, status=status, headers=headers)
    finally:
        upstream.release()


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    """Write to a stream whose client may have left meanwhile."""
    try:
        await response.write(data)
    except (ConnectionError, RuntimeError):
        log.debug("client left before the end of the stream")
