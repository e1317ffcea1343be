"""The chat endpoints: authenticate, validate, price, hold, forward, relay, settle."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from sqlalchemy import Connection

from gateway.core import idempotency, metering
from gateway.core.admission import admit
from gateway.core.idempotency import Answer, Replay, Reservation, replay_headers
from gateway.core.metering import Admission, Caller, Charge, Settlement
from gateway.core.pricing import cost, format_credits
from gateway.core.settlement import ledger_outcome, settle
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    LedgerUnavailable,
    RequestTimeout,
    RequestTooLarge,
    UnknownModel,
)
from gateway.web import attribution, shutdown
from gateway.web.auth import model_not_allowed
from gateway.web.state import (
    ACCESS_LOG,
    BACKGROUND,
    DEADLINES,
    GATE,
    GAUGES,
    INSTANCE_ID,
    KEYS,
    METRICS,
    REQUESTS,
    SETTINGS,
    SETTLING,
    STORE,
    UPSTREAM,
)
from gateway.web.upstream import (
    SseUsageScanner,
    end_stream,
    open_upstream,
    read_upstream_body,
    read_whole,
    relay_stream,
    relayed_headers,
    upstream_headers,
    usage_from_body,
)

log = logging.getLogger(__name__)


class _Repeated(dict[str, Any]):
    """A JSON object that had a key more than once (`json` keeps the last value)."""

    key: str = ""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    repeated = _Repeated(obj)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            repeated.key = key
            break
        seen.add(key)
    return repeated


# One decoder for every request: `json.loads` with a hook would build a new one each time.
_DECODER = json.JSONDecoder(object_pairs_hook=_object)


def parse_chat(body: bytes) -> tuple[str, int, bool, Any]:
    """Validate a chat body; returns (model, message count, stream, its `user` field as sent) or
    raises InvalidRequest.

    The body is forwarded as it is, so what is priced must be what upstream reads: it must be UTF-8
    (no other encoding `json` would guess), and no top-level key may appear twice, since `json`
    keeps the last value where another parser may keep the first (two `model`s: which is billed?).
    """
    try:
        payload = _DECODER.decode(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not valid UTF-8; send a JSON object.") from None
    except (ValueError, RecursionError):
        raise InvalidRequest("The request body is not valid JSON; send a JSON object.") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object with `model` and `messages`.")
    if isinstance(payload, _Repeated):
        raise InvalidRequest(
            f"The request body has the key {payload.key[:100]!r} more than once; send each key once."
        )
    model = payload.get("model")
    if not isinstance(model, str):
        raise InvalidRequest('`model` must be a string naming a priced model, e.g. "openai/gpt-oss-20b".')
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest('`messages` must be a non-empty list of {"role", "content"} objects.')
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"`messages[{index}]` must be an object with a string `role`.")
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("`stream` must be true or false.")
    return model, len(messages), stream, payload.get("user")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes without reading it whole.

    A body that takes longer than the client read timeout to arrive is refused (408), so clients
    dribbling their bodies cannot pile up.
    """
    length = request.content_length
    if length is not None and length > limit:
        raise RequestTooLarge(f"The request body is {length} bytes; this gateway accepts at most {limit}.")
    timeout = request.app[SETTINGS].client_read_timeout_seconds
    try:
        return await read_whole(request, timeout)
    except web.HTTPRequestEntityTooLarge:
        raise RequestTooLarge(
            f"The request body is over {limit} bytes, the most this gateway accepts."
        ) from None
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {timeout:g} seconds.") from None


def _credit_headers(admission: Admission, charged: bool) -> dict[str, str]:
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
    return headers


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
            raise
        response = await _forward(request, admission, body, started, reservation)
        status = response.status
        return response
    except GatewayError as exc:
        status, outcome = exc.status, exc.outcome or exc.type
        raise
    finally:
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


@dataclass
class _Progress:
    """How far an admitted request got: what to settle, and when upstream was done with."""

    settlement: Settlement
    started: float
    forwarded_at: float
    upstream_done: float
    reservation: Reservation | None = None
    # The first answer, kept for replays when the request carries an Idempotency-Key.
    answer: Answer | None = None
    settled: bool = False
    # Its hold was expired by a sweep before it settled: it is not charged (see `_settle`).
    expired: bool = False

    def unit(self, admission: Admission) -> tuple[Callable[..., bool], tuple[Any, ...]]:
        """The unit of work that settles the request, and its arguments (minus the time)."""
        if self.reservation is None:
            return settle, (admission, self.settlement)
        return _settle_once, (admission, self.settlement, self.reservation, self.answer)


def _settle_once(
    conn: Connection,
    admission: Admission,
    settlement: Settlement,
    reservation: Reservation,
    answer: Answer | None,
    at: int,
) -> bool:
    return idempotency.settle_once(conn, admission, settlement, at, reservation, answer)


async def _forward(
    request: web.Request,
    admission: Admission,
    body: bytes,
    started: float,
    reservation: Reservation | None,
) -> web.StreamResponse:
    """Forward an admitted request and relay the answer; settle in `finally`, whatever happens."""
    forwarded_at = time.perf_counter()
    progress = _Progress(Settlement("upstream_unavailable"), started, forwarded_at, forwarded_at, reservation)
    request[PROGRESS] = progress
    try:
        response = await _exchange(request, admission, body, progress)
    except GatewayError as exc:
        progress.upstream_done = time.perf_counter()
        if exc.outcome in ("upstream_timeout", "upstream_unavailable"):
            progress.settlement = Settlement(exc.outcome, progress.settlement.upstream_status)
        exc.headers = _credit_headers(admission, charged=False)
        raise
    finally:
        if not progress.settled:
            await _settle(request.app, admission, progress)
    if progress.expired and not response.prepared:
        # Not sent yet: the headers say what the ledger says.
        response.headers.update(_credit_headers(admission, charged=False))
    return response


async def _exchange(
    request: web.Request, admission: Admission, body: bytes, progress: _Progress
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
        headers = relayed_headers(upstream)
        headers.update(_credit_headers(admission, charged=ok))
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
            await _settle(app, admission, progress)
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


# How far an admitted request got, for its access log line.
PROGRESS: web.RequestKey[_Progress] = web.RequestKey("progress")
SETTLE_RETRY_MAX_SECONDS = 5.0
# An SSE comment (ignored by clients' parsers, seen by people reading the stream).
EXPIRED_NOTE = (
    b": x-credits-charged 0 (this request's hold expired before it settled, so it was not charged)\n\n"
)


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    """Write to a stream whose client may have left meanwhile."""
    try:
        await response.write(data)
    except (ConnectionError, RuntimeError):
        log.debug("client left before the end of the stream")


async def _settle(app: web.Application, admission: Admission, progress: _Progress) -> None:
    """Write the settlement; if the database is down, keep retrying in the background."""
    store = app[STORE]
    settlement = progress.settlement
    progress.settled = True
    settled = time.perf_counter()
    retrying = False
    fn, args = progress.unit(admission)
    # Not cut while it writes: a cut would leave the settlement's outcome unheard, and not retried.
    current = asyncio.current_task()
    shutdown.busy(app, current)
    try:
        done = await store.run(fn, *args, metering.now_us())
    except LedgerUnavailable:
        retrying = True
        task = asyncio.get_running_loop().create_task(_settle_later(app, admission, progress))
        app[BACKGROUND].add(task)
        task.add_done_callback(app[BACKGROUND].discard)
        return
    finally:
        shutdown.idle(app, current)
        del current  # no reference cycle through an error's traceback
        if not retrying:
            app[SETTLING].discard(admission.charge.request_id)
    if not done:
        # Its process stalled past the hold TTL and another released the hold: the budget may have
        # been given to other requests since, so charging now could overspend. It stays `expired`,
        # uncharged, and the caller is told so (`_forward`, EXPIRED_NOTE).
        progress.expired = True
        log.warning(
            "request %s settled after its hold expired; left as expired, not charged",
            admission.charge.request_id,
        )
        app[METRICS].requests.labels(admission.charge.model, "expired").inc()
        return
    finished = time.perf_counter()
    record_settlement(app, admission, settlement, finished - progress.started)
    app[METRICS].overhead.observe((progress.forwarded_at - progress.started) + (finished - settled))


async def _settle_later(app: web.Application, admission: Admission, progress: _Progress) -> None:
    delay = 0.1
    settlement = progress.settlement
    fn, args = progress.unit(admission)
    try:
        while True:
            await asyncio.sleep(delay)
            try:
                done = await app[STORE].run(fn, *args, metering.now_us())
                if not done:
                    # Gone: expired by a sweep, or settled by an earlier try whose commit went
                    # through although its answer was lost with the connection.
                    ours = await app[STORE].read(ledger_outcome, admission.charge.request_id)
                    done = ours == settlement.outcome
            except LedgerUnavailable:
                delay = min(delay * 2, SETTLE_RETRY_MAX_SECONDS)
                continue
            if done:
                record_settlement(app, admission, settlement, None)
            return
    finally:
        app[SETTLING].discard(admission.charge.request_id)


def record_settlement(
    app: web.Application, admission: Admission, settlement: Settlement, duration: float | None
) -> None:
    """Count a settled request in the metrics."""
    metrics = app[METRICS]
    charge = admission.charge
    metrics.requests.labels(charge.model, settlement.outcome).inc()
    if settlement.outcome == "charged":
        team = charge.caller.team_name or ""
        metrics.credits_charged.labels(charge.model, team).inc(charge.credits / 1_000_000)
        metrics.messages_charged.labels(charge.model, team).inc(charge.message_count)
        if settlement.prompt_tokens is not None:
            metrics.tokens.labels(charge.model, "prompt").inc(settlement.prompt_tokens)
        if settlement.completion_tokens is not None:
            metrics.tokens.labels(charge.model, "completion").inc(settlement.completion_tokens)
    if duration is not None:
        metrics.request_duration.labels(charge.model, "true" if charge.stream else "false").observe(duration)
    if admission.allocations:
        # The budget gauges refresh soon after, once for a burst of settlements.
        app[GAUGES].mark_dirty()
