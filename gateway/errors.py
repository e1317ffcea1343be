"""The gateway's own errors: one class per status and type, rendered as {"error": {...}}.

GatewayError
 ├── InvalidRequest        400 invalid_request
 ├── UnknownModel          400 unknown_model
 ├── Unauthorized          401 unauthorized
 ├── BudgetExceeded        402 budget_exceeded
 ├── AdminDisabled         403 admin_disabled
 ├── ModelNotAllowed       403 model_not_allowed
 ├── NotFound              404 not_found
 ├── RequestTimeout        408 request_timeout
 ├── Conflict              409 conflict
 ├── RequestTooLarge       413 request_too_large
 ├── RateLimited           429 rate_limited
 ├── UpstreamRateLimited   429 upstream_rate_limited
 ├── UpstreamUnavailable   502 upstream_unavailable
 ├── LedgerUnavailable     503 ledger_unavailable
 ├── Overloaded            503 overloaded
 └── UpstreamTimeout       504 upstream_timeout
"""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    """An error the gateway answers itself; never forwarded upstream."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    outcome: ClassVar[str | None] = None  # the metrics outcome, when it is a chat refusal

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers: dict[str, str] = {}

    def body(self) -> dict[str, Any]:
        """The JSON body: {"error": {"type", "message", ...details}}."""
        return {"error": {"type": self.type, "message": self.message, **self.details}}


class InvalidRequest(GatewayError):
    status, type, outcome = 400, "invalid_request", "invalid_request"


class UnknownModel(GatewayError):
    status, type, outcome = 400, "unknown_model", "unknown_model"


class Unauthorized(GatewayError):
    status, type, outcome = 401, "unauthorized", "unauthorized"


class BudgetExceeded(GatewayError):
    status, type, outcome = 402, "budget_exceeded", "budget_exceeded"


class AdminDisabled(GatewayError):
    status, type = 403, "admin_disabled"


class ModelNotAllowed(GatewayError):
    status, type, outcome = 403, "model_not_allowed", "model_not_allowed"


class NotFound(GatewayError):
    status, type = 404, "not_found"


class Conflict(GatewayError):
    status, type = 409, "conflict"


class IdempotencyConflict(GatewayError):
    status, type, outcome = 409, "idempotency_in_flight", "idempotency_conflict"


class IdempotencyMismatch(GatewayError):
    status, type, outcome = 422, "idempotency_mismatch", "idempotency_mismatch"


class RequestTimeout(GatewayError):
    status, type, outcome = 408, "request_timeout", "request_timeout"


class RequestTooLarge(GatewayError):
    status, type, outcome = 413, "request_too_large", "request_too_large"


class RateLimited(GatewayError):
    status, type, outcome = 429, "rate_limited", "rate_limited"


class UpstreamRateLimited(GatewayError):
    status, type, outcome = 429, "upstream_rate_limited", "upstream_rate_limited"


class UpstreamUnavailable(GatewayError):
    status, type, outcome = 502, "upstream_unavailable", "upstream_unavailable"


class LedgerUnavailable(GatewayError):
    status, type, outcome = 503, "ledger_unavailable", "ledger_unavailable"
    reason = ""  # what the database driver said, for logs and the CLI


class Overloaded(GatewayError):
    status, type, outcome = 503, "overloaded", "overloaded"


class UpstreamTimeout(GatewayError):
    status, type, outcome = 504, "upstream_timeout", "upstream_timeout"
