"""Middlewares: every error leaves the gateway as {"error": {"type", "message"}} JSON, never a traceback."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import GatewayError
from gateway.jsonout import json_response

log = logging.getLogger(__name__)

_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def error_response(error: GatewayError, headers: dict[str, str] | None = None) -> web.Response:
    """The JSON response for a gateway error."""
    return json_response(error.body(), status=error.status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render GatewayError and aiohttp's HTTP errors as JSON; log anything unexpected."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return error_response(exc, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = _HTTP_TYPES.get(exc.status, "http_error")
        message = f"{exc.reason}: {request.method} {request.path}"
        if exc.status == 404:
            message += " is not an endpoint of this gateway; chat is POST /api/v1/chat"
        return json_response(
            {"error": {"type": kind, "message": message}}, status=exc.status, headers=_allow(exc)
        )
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_response(
            {"error": {"type": "internal_error", "message": "The gateway failed unexpectedly; see its log."}},
            status=500,
        )


def _allow(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None
