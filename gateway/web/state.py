"""Typed application keys: everything a handler can find on the app."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from gateway.ops.gauges import BudgetGauges
from gateway.ops.metrics import Metrics
from gateway.ops.settings import Settings
from gateway.store import Store
from gateway.web.access_log import AccessLog
from gateway.web.auth import KeyCache
from gateway.web.limits import Gate, UpstreamCaps
from gateway.web.readiness import Readiness
from gateway.web.upstream import Deadlines
from gateway.web.upstream_client import UpstreamPool

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
METRICS = web.AppKey("metrics", Metrics)
KEYS = web.AppKey("keys", KeyCache)
UPSTREAM = web.AppKey("upstream", UpstreamPool)
# The upstream calls' timeouts (see `upstream.Deadlines`).
DEADLINES = web.AppKey("deadlines", Deadlines)
INSTANCE_ID = web.AppKey("instance_id", str)
# Work that outlives its request: settlements being retried, requests whose client left.
BACKGROUND: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("background")
# Request ids this process has admitted and not yet settled: hold expiry leaves their holds alone.
SETTLING: web.AppKey[set[str]] = web.AppKey("settling")
GAUGES = web.AppKey("gauges", BudgetGauges)
# The chat requests under way, each with what a shutdown may do to it now (`shutdown.RUNNING`...).
REQUESTS: web.AppKey[dict[asyncio.Task[Any], int]] = web.AppKey("requests")
# Chat requests in flight against GATEWAY_MAX_CONCURRENT_REQUESTS (see `limits`).
GATE = web.AppKey("gate", Gate)
# The upstream account's caps in this process (`on` False when neither is set).
UPSTREAM_CAPS = web.AppKey("upstream_caps", UpstreamCaps)
ACCESS_LOG = web.AppKey("access_log", AccessLog)
READINESS = web.AppKey("readiness", Readiness)
