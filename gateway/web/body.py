"""Request bodies: read within the size and time limits; a chat body's JSON parsed and validated."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from gateway.errors import InvalidRequest, RequestTimeout, RequestTooLarge
from gateway.jsonout import document, scanner
from gateway.web.state import SETTINGS
from gateway.web.upstream import read_whole


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
_SCAN = scanner(json.JSONDecoder(object_pairs_hook=_object))


def parse_chat(body: bytes) -> tuple[str, int, bool, Any]:
    """Validate a chat body; returns (model, message count, stream, its `user` field as sent) or
    raises InvalidRequest.

    The body is forwarded as it is, so what is priced must be what upstream reads: it must be UTF-8
    (no other encoding `json` would guess), and no top-level key may appear twice, since `json`
    keeps the last value where another parser may keep the first (two `model`s: which is billed?).
    """
    try:
        payload = document(body.decode("utf-8"), _SCAN)
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
