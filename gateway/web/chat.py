"""The chat endpoints: authenticate, validate, price, admit; `forward` relays and `settlement` settles."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from gateway.core import idempotency, metering
from gateway.core.admission import admit
from gateway.core.idempotency import Replay, Reservation, replay_headers
from gateway.core.metering import Caller, Charge
from gateway.core.pricing import cost
from gateway.errors import GatewayError, RateLimited, UnknownModel
from gateway.web import attribution, shutdown
from gateway.web.auth import model_not_allowed
from gateway.web.body import parse_chat, read_body
from gateway.web.forward import forward
from gateway.web.settle import PROGRESS
from gateway.web.state import (
    ACCESS_LOG,
    BACKGROUND,
    GATE,
    INSTANCE_ID,
    KEYS,
    METRICS,
    REQUESTS,
    SETTINGS,
    SETTLING,
    STORE,
    UPSTREAM_CAPS,
)

log = logging.getLogger(__name__)


async def chat(request: web.Request) -> web.StreamResponse:
    """POST /api/v1/chat and /v1/chat/completions."""
    # The work runs in its own task, shielded: a server that cancels handlers when their client
    # leaves (aiohttp's `handler_cancellation`; its test server does) must abandon neither a hold
    # nor an upstream call already under way. The request is settled as if the client had stayed.
    # Servers that cancel only at shutdown, past their grace period (the default, and `gateway
    # serve`), are spared the extra task: a request cancelled there still settles in `finally`,
    # uncharged unless upstream's 2xx had arrived.
    if not getattr(getattr(request.protocol, "_manager", None), "handler_cancellation", True):
        return await _chat(request)
    work = asyncio.ensure_future(_chat(request))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        if not work.done():
            background = request.app[BACKGROUND]
            background.add(work)
            work.add_done_callback(lambda task: _detached_done(background, task))
        raise
    finally:
        del work  # this frame is in an error's traceback: no reference cycle through the task


def _detached_done(background: set[asyncio.Task[Any]], task: asyncio.Task[Any]) -> None:
    background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.debug("request finished after its client left: %r", task.exception())


async def _chat(request: web.Request) -> web.StreamResponse:
    app = request.app
    metrics = app[METRICS]
    started = time.perf_counter()
    gate = app[GATE]
    if gate.full():
        # Before the body is read or anything held: a counter compared, nothing awaited.
        refusal = gate.refusal()
        metrics.requests.labels("", "overloaded").inc()
        _log_chat(request, started, refusal.status, refusal.outcome)
        raise refusal
    gate.active += 1
    metrics.inflight.inc()
    model_label = ""
    # A shutdown may cut this request (see `shutdown`).
    task = asyncio.current_task()
    assert task is not None
    app[REQUESTS][task] = shutdown.RUNNING
    status, outcome = 500, "internal_error"
    model: str | None = None
    caller = charge = None
    caps = app[UPSTREAM_CAPS]
    capped = False
    try:
        settings = app[SETTINGS]
        try:
            caller = await app[KEYS].caller(request.headers.get("Authorization"))
            body = await read_body(request, settings.max_body_bytes)
            model, message_count, stream, body_user = parse_chat(body)
            headers = request.headers
            end_user = attribution.end_user(headers.get(attribution.END_USER_HEADER), body_user)
            tags = attribution.tags(headers.get(attribution.TAGS_HEADER))
            unit_price = settings.pricing.unit_price(model)
            if unit_price is None:
                raise UnknownModel(
                    f"Model {model[:200]!r} is not priced by this gateway. Priced models: "
                    f"{', '.join(settings.pricing.models())}."
                )
            model_label = model
            if caller.models is not None and model not in caller.models:
                raise model_not_allowed(model, caller.models, settings.pricing.models())
            charge = Charge(
                request_id=metering.new_request_id(),
                caller=caller,
                model=model,
                message_count=message_count,
                unit_price=unit_price,
                credits=cost(message_count, unit_price),
                stream=stream,
                end_user=end_user,
                tags=tags,
            )
            reservation = _reservation(request, body)
            if caps.on:
                caps.enter(metering.now_us())
                capped = True
            if reservation is None:
                admission = await shutdown.admitting(
                    app, task, app[STORE].run(admit, charge, app[INSTANCE_ID], metering.now_us())
                )
            else:
                admitted = await shutdown.admitting(
                    app,
                    task,
                    app[STORE].run(
                        idempotency.admit_once, charge, app[INSTANCE_ID], metering.now_us(), reservation
                    ),
                )
                if isinstance(admitted, Replay):
                    status, outcome, charge = admitted.status, "replayed", None
                    return web.Response(
                        body=admitted.body, status=admitted.status, headers=replay_headers(admitted)
                    )
                admission = admitted
            app[SETTLING].add(charge.request_id)
        except GatewayError as exc:
            if exc.outcome:
                metrics.requests.labels(model_label, exc.outcome).inc()
                if isinstance(exc, RateLimited):
                    metrics.rate_limited.labels(exc.details["scope"], exc.details["kind"]).inc()
                elif exc.outcome == "upstream_rate_limited":
                    metrics.upstream_rate_limited.labels("gateway").inc()
            raise
        response = await forward(request, admission, body, started, reservation)
        status = response.status
        return response
    except GatewayError as exc:
        status, outcome = exc.status, exc.outcome or exc.type
        raise
    finally:
        if capped:
            caps.leave()
        gate.active -= 1
        metrics.inflight.dec()
        del app[REQUESTS][task]
        # An error's traceback holds this frame: no reference cycle through the task.
        del task
        if app[ACCESS_LOG].on:
            _log_chat(request, started, status, outcome, model, caller, charge)


def _log_chat(
    request: web.Request,
    started: float,
    status: int,
    outcome: str | None,
    model: str | None = None,
    caller: Caller | None = None,
    charge: Charge | None = None,
) -> None:
    """The access log line of a chat request; what became of an admitted one is in its progress."""
    access = request.app[ACCESS_LOG]
    if not access.on:
        return
    progress = request.get(PROGRESS)
    request_id = upstream_ms = None
    credits = 0
    if progress is not None and charge is not None:
        outcome = "expired" if progress.expired else progress.settlement.outcome
        request_id = charge.request_id
        upstream_ms = (progress.upstream_done - progress.forwarded_at) * 1000
        credits = charge.credits if outcome == "charged" else 0
    messages = charge.message_count if charge is not None else None
    stream = charge.stream if charge is not None else None
    access.chat(
        request,
        started,
        status,
        outcome,
        request_id,
        model,
        caller,
        messages,
        stream,
        credits,
        upstream_ms,
        charge.end_user if charge is not None else None,
        charge.tags if charge is not None else (),
    )


def _reservation(request: web.Request, body: bytes) -> Reservation | None:
    """The Idempotency-Key of the request, if it has one."""
    value = request.headers.get(idempotency.HEADER)
    if value is None:
        return None
    return Reservation(idempotency.check_key(value), idempotency.body_digest(body))
