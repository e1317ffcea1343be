"""Typed application keys: everything a handler can find on the app."""

from __future__ import annotations

import asyncio

from aiohttp import ClientSession, web

from .auth import KeyCache
from .gauges import BudgetGauges
from .metrics import Metrics
from .settings import Settings
from .store import Store

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
METRICS = web.AppKey("metrics", Metrics)
KEYS = web.AppKey("keys", KeyCache)
UPSTREAM = web.AppKey("upstream", ClientSession)
INSTANCE_ID = web.AppKey("instance_id", str)
BACKGROUND: web.AppKey[set[asyncio.Task[None]]] = web.AppKey("background")
GAUGES = web.AppKey("gauges", BudgetGauges)
