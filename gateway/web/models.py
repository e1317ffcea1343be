"""`GET /v1/models` and `GET /api/v1/models`: the models the calling key may use, as OpenAI lists them.

OpenAI-compatible tools call it at start-up, so it is never refused for budget: only a missing or
bad key (401) stops it. Each model carries its price, `credits_per_message`, beside OpenAI's fields
(`created` is 0: the gateway does not know when a model was made).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.core.pricing import credits_json
from gateway.jsonout import json_response
from gateway.web.admin_request import query_params
from gateway.web.state import KEYS, SETTINGS


def add_routes(router: web.UrlDispatcher) -> None:
    """Register GET /v1/models and GET /api/v1/models."""
    router.add_get("/v1/models", list_models)
    router.add_get("/api/v1/models", list_models)


def model_list(priced: list[tuple[str, int]], allowed: frozenset[str] | None) -> dict[str, Any]:
    """The OpenAI list of the priced models in `allowed` (None: every one)."""
    return {
        "object": "list",
        "data": [
            {
                "id": model,
                "object": "model",
                "created": 0,
                "owned_by": model.partition("/")[0] if "/" in model else "gateway",
                "credits_per_message": credits_json(price),
            }
            for model, price in priced
            if allowed is None or model in allowed
        ],
    }


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: the calling key's models."""
    caller = await request.app[KEYS].caller(request.headers.get("Authorization"))
    query_params(request, ())
    return json_response(model_list(request.app[SETTINGS].pricing.items(), caller.models))
