"""The benchmark's fake upstream: the gateway's own `FakeUpstream`, remembering only its last request.

`gateway fake-upstream` keeps every request it receives (tests read them back). Under load that list
grows by about a kilobyte a request, and the garbage collector's full passes over it stall the
server: after a minute at 10k req/s its p99 is hundreds of milliseconds and its throughput drifts
down, which would bias whichever target is measured last. Same app, same answers, bounded memory.
"""

from __future__ import annotations

import argparse
import collections

from aiohttp import web

from gateway.ops.fake_upstream import FakeUpstream


def main() -> None:
    """Serve the fake upstream on a loopback port."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    fake = FakeUpstream(received=collections.deque(maxlen=1))  # type: ignore[arg-type]
    web.run_app(fake.app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
