"""A bare pass-through aiohttp proxy: the baseline the gateway is measured against (issue 7).

No auth, no metering, no metrics: one shared `ClientSession`, the request body forwarded to the
upstream URL, upstream's status, content type and body relayed; an SSE answer is relayed chunk by
chunk as it arrives. It pays for what every aiohttp proxy pays for (two HTTP parses, two writes,
the client pool), so the gap between it and the gateway is the price of metering.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)
UPSTREAM_URL = web.AppKey("upstream_url", str)

# The gateway's pool was this size before GATEWAY_MAX_CONCURRENT_REQUESTS (bench/streams.py sizes
# it as the gateway's is); the TCP connect timed as the gateway times it.
MAX_CONNECTIONS = 1000
CONNECT_TIMEOUT_SECONDS = 10.0
RELAYED_HEADERS = ("Content-Type", "Cache-Control")


async def proxy(request: web.Request) -> web.StreamResponse:
    """Forward the body upstream; relay the answer (streamed when it is an event stream)."""
    body = await request.read()
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    try:
        upstream = await request.app[UPSTREAM].post(
            request.app[UPSTREAM_URL], data=body, headers=headers, allow_redirects=False
        )
    except aiohttp.ClientError:
        raise web.HTTPBadGateway() from None
    try:
        relayed = {name: upstream.headers[name] for name in RELAYED_HEADERS if name in upstream.headers}
        if not relayed.get("Content-Type", "").startswith("text/event-stream"):
            return web.Response(status=upstream.status, body=await upstream.read(), headers=relayed)
        response = web.StreamResponse(status=upstream.status, headers=relayed)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        upstream.release()


def create_app(upstream_url: str, max_connections: int = MAX_CONNECTIONS) -> web.Application:
    """The bare proxy: every POST path goes to `upstream_url`, over at most `max_connections`."""
    app = web.Application()
    app[UPSTREAM_URL] = upstream_url

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_SECONDS),
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as session:
            app[UPSTREAM] = session
            yield

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/{tail:.*}", proxy)
    return app


# As `gateway serve`'s (gateway.web.limits.LISTEN_BACKLOG).
BACKLOG = 4096


def main() -> None:
    """Serve the bare proxy on a loopback port."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="full URL every request is forwarded to")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    parser.add_argument(
        "--max-connections", type=int, default=MAX_CONNECTIONS, help="upstream pool size (0: no limit)"
    )
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = create_app(args.upstream, args.max_connections)
    web.run_app(app, backlog=BACKLOG, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
