"""Settings: an optional TOML file, overridden by GATEWAY_* environment variables, validated up front."""

from __future__ import annotations

import base64
import binascii
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.core import alerts, windows
from gateway.core.pricing import PriceTable

# More worker processes than this is a typo, not a machine (`gateway serve --workers`).
MAX_WORKERS = 256
# What the access log prints (`GATEWAY_ACCESS_LOG`): a JSON object a line, a readable line, nothing.
ACCESS_LOG_FORMATS = ("json", "text", "off")
# The web console at /ui/ (`GATEWAY_UI`): on while GATEWAY_ADMIN_TOKEN is set, or off.
UI_MODES = ("on", "off")


class ConfigError(Exception):
    """A bad setting; its message is the one line shown to the operator."""


class Secret:
    """A string that never shows itself in a repr or a log line."""

    def __init__(self, value: str) -> None:
        self._value = value

    def __str__(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _url(name: str, value: str, schemes: tuple[str, ...]) -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not (parts.netloc or parts.path):
        raise ConfigError(f"{name}: {value!r} is not a valid URL (expected {' or '.join(schemes)})")
    return value


def _positive(kind: type[int] | type[float]) -> Callable[[str, object], Any]:
    def cast(name: str, value: object) -> Any:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = kind(str(value))
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: {value!r} is not a valid {kind.__name__}") from None
        if number <= 0:
            raise ConfigError(f"{name}: must be greater than 0, got {value!r}")
        return number

    return cast


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


def _port(name: str, value: object) -> int:
    port: int = _positive(int)(name, value)
    if port > 65535:
        raise ConfigError(f"{name}: {value!r} is not a valid port (1-65535)")
    return port


def _workers(name: str, value: object) -> int:
    workers: int = _positive(int)(name, value)
    if workers > MAX_WORKERS:
        raise ConfigError(f"{name}: {value!r} is too many worker processes (1-{MAX_WORKERS})")
    return workers


def _access_log(name: str, value: object) -> str:
    text = _text(name, value).strip().lower()
    if text not in ACCESS_LOG_FORMATS:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(ACCESS_LOG_FORMATS)}")
    return text


def _ui(name: str, value: object) -> str:
    text = _text(name, value).strip().lower()
    if text not in UI_MODES:
        raise ConfigError(
            f"{name}: {value!r} is not one of {', '.join(UI_MODES)} (the console at /ui/ is on "
            "whenever GATEWAY_ADMIN_TOKEN is set, unless this is off)"
        )
    return text


def _database_url(name: str, value: object) -> str:
    return _url(name, _text(name, value), ("sqlite+aiosqlite", "postgresql+asyncpg"))


def _upstream_url(name: str, value: object) -> str:
    url = _url(name, _text(name, value), ("http", "https"))
    if not urlsplit(url).netloc:
        raise ConfigError(f"{name}: {value!r} has no host")
    return url


def _timezone(name: str, value: object) -> str:
    try:
        return windows.check_zone(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _week_starts(name: str, value: object) -> str:
    try:
        return windows.check_week_starts(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _thresholds(name: str, value: object) -> tuple[int, ...]:
    try:
        return alerts.check(value, name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


WEBHOOK_FORMATS = ("standard", "slack")


@dataclass(frozen=True)
class Webhook:
    """An endpoint alert events are posted to (section 9 of the contract)."""

    url: str
    secret: Secret | None = None
    format: str = "standard"  # standard (Standard Webhooks, signed) or slack ({"text": ...})


def _webhook(where: str, url: object, secret: object, fmt: object) -> Webhook:
    """One endpoint, checked; `where` names its settings ("GATEWAY_WEBHOOK" or "webhooks[1]")."""
    env = where.startswith("GATEWAY_")
    url_name, secret_name = (
        (f"{where}_URL", f"{where}_SECRET") if env else (f"{where}.url", f"{where}.secret")
    )
    checked = _upstream_url(url_name, url)
    if fmt not in WEBHOOK_FORMATS:
        raise ConfigError(f"{where}.format: {fmt!r} is not a webhook format (standard or slack)")
    if secret is not None:
        if not isinstance(secret, str) or not secret.strip():
            raise ConfigError(f"{secret_name}: the signing secret must not be empty")
        if secret.startswith("whsec_"):
            try:
                base64.b64decode(secret.removeprefix("whsec_"), validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(
                    f"{secret_name}: a secret starting with whsec_ must be base64 after it"
                ) from None
    elif fmt == "standard":
        raise ConfigError(
            f"{secret_name}: the standard webhook format signs every event; give it a signing secret"
        )
    return Webhook(checked, None if secret is None else Secret(secret), str(fmt))


def _webhooks(tables: object, url: object, secret: object, env: Mapping[str, str]) -> tuple[Webhook, ...]:
    """GATEWAY_WEBHOOK_URL/SECRET (or the TOML's webhook_url/webhook_secret), then [[webhooks]]."""
    url = env.get("GATEWAY_WEBHOOK_URL", url)
    secret = env.get("GATEWAY_WEBHOOK_SECRET", secret)
    hooks: list[Webhook] = []
    if url is not None and url != "":
        hooks.append(_webhook("GATEWAY_WEBHOOK", url, secret, "standard"))
    elif secret is not None:
        raise ConfigError("GATEWAY_WEBHOOK_SECRET: set, but GATEWAY_WEBHOOK_URL is not")
    if tables is None:
        return tuple(hooks)
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("webhooks: expected [[webhooks]] tables, each with url, secret and format")
    for i, table in enumerate(tables, start=1):
        unknown = sorted(set(table) - {"url", "secret", "format"})
        if unknown:
            raise ConfigError(f"webhooks[{i}].{unknown[0]}: unknown; a webhook has url, secret and format")
        hooks.append(
            _webhook(f"webhooks[{i}]", table.get("url"), table.get("secret"), table.get("format", "standard"))
        )
    return tuple(hooks)


# setting -> (cast, default). The environment variable is GATEWAY_<SETTING upper-cased>.
_FIELDS: dict[str, tuple[Callable[[str, object], Any], Any]] = {
    "host": (_text, "127.0.0.1"),
    "port": (_port, 8080),
    "database_url": (_database_url, "sqlite+aiosqlite:///gateway.db"),
    "upstream_url": (_upstream_url, "https://axerity.com/api/v1/chat"),
    "upstream_api_key": (_text, None),
    "admin_token": (_text, None),
    "upstream_timeout_seconds": (_positive(float), 300.0),
    "hold_ttl_seconds": (_positive(float), 360.0),
    "max_body_bytes": (_positive(int), 4 * 1024 * 1024),
    "stream_idle_timeout_seconds": (_positive(float), 120.0),
    "client_read_timeout_seconds": (_positive(float), 30.0),
    "cache_ttl_seconds": (_positive(float), 2.0),
    "db_pool_size": (_positive(int), 10),
    "workers": (_workers, 1),
    "shutdown_grace_seconds": (_positive(float), 30.0),
    "max_concurrent_requests": (_positive(int), 10_000),
    "upstream_max_concurrent": (_positive(int), None),
    "upstream_rpm": (_positive(int), None),
    "access_log": (_access_log, "json"),
    "ui": (_ui, "on"),
    "alert_thresholds": (_thresholds, alerts.DEFAULT_THRESHOLDS),
    "webhook_retry_base_seconds": (_positive(float), 2.0),
    "webhook_timeout_seconds": (_positive(float), 10.0),
    "timezone": (_timezone, "UTC"),
    "week_starts": (_week_starts, "monday"),
}


@dataclass(frozen=True)
class Settings:
    """Everything the gateway is configured with."""

    host: str = "127.0.0.1"
    port: int = 8080
    database_url: str = "sqlite+aiosqlite:///gateway.db"
    upstream_url: str = "https://axerity.com/api/v1/chat"
    upstream_api_key: Secret | None = None
    admin_token: Secret | None = None
    upstream_timeout_seconds: float = 300.0
    hold_ttl_seconds: float = 360.0
    max_body_bytes: int = 4 * 1024 * 1024
    # How long a started stream may go without a chunk from upstream before it is ended.
    stream_idle_timeout_seconds: float = 120.0
    # How long a client may take to send its request headers, or its body, or to accept one chunk of
    # a streamed answer; past it the connection is closed, so slow clients cannot pile up.
    client_read_timeout_seconds: float = 30.0
    # How long key and budget lookups are cached; revocation takes effect on every replica within it.
    cache_ttl_seconds: float = 2.0
    db_pool_size: int = 10
    # Processes serving the one port (SO_REUSEPORT) under `gateway serve`; 1 is a single process.
    workers: int = 1
    # On SIGTERM/SIGINT, how long requests in flight may go on before they are cut (and settled).
    shutdown_grace_seconds: float = 30.0
    # Chat requests in flight in one process; one more is refused with 503 `overloaded`. The
    # upstream connection pool has as many connections, so no request waits for one.
    max_concurrent_requests: int = 10_000
    # Caps for the upstream account, in each process (contract section 13): requests forwarded at
    # once, and per minute; past them 429 `upstream_rate_limited`. None: no cap.
    upstream_max_concurrent: int | None = None
    upstream_rpm: int | None = None
    # One line a request on stdout: "json", "text" or "off" (see `gateway.web.access_log`).
    access_log: str = "json"
    # The web console at /ui/: "on" (served while admin_token is set) or "off".
    ui: str = "on"
    pricing: PriceTable = field(default_factory=PriceTable.from_config)
    # Alerts (section 9): default thresholds, webhook endpoints, the first retry's delay (doubling
    # from there, with jitter) and how long one delivery attempt may take.
    alert_thresholds: tuple[int, ...] = alerts.DEFAULT_THRESHOLDS
    webhooks: tuple[Webhook, ...] = ()
    webhook_retry_base_seconds: float = 2.0
    webhook_timeout_seconds: float = 10.0
    # Where new budgets' windows begin unless set otherwise (gateway/core/windows.py), and the zone
    # of reports' days.
    timezone: str = "UTC"
    week_starts: str = "monday"

    @property
    def window_rule(self) -> windows.Rule:
        """The rule a budget made without one gets: GATEWAY_TIMEZONE, GATEWAY_WEEK_STARTS, the 1st."""
        return windows.Rule(self.timezone, self.week_starts, 1)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        environ: Mapping[str, str] | None = None,
        flags: Mapping[str, str | None] | None = None,
    ) -> Settings:
        """Read the TOML file (if any), apply GATEWAY_* variables over it, and validate.

        `flags` are command-line options (`{"workers": "4"}` for `--workers 4`; None when not
        given), over the file and the environment alike.
        """
        env = os.environ if environ is None else environ
        path = path or env.get("GATEWAY_CONFIG") or None
        raw: dict[str, Any] = {}
        if path:
            try:
                raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise ConfigError(f"config file {str(path)!r} does not exist") from None
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"config file {str(path)!r} cannot be read: {exc}") from None
        pricing = raw.pop("pricing", {})
        if not isinstance(pricing, dict):
            raise ConfigError("pricing: expected a table of model = credits per message")
        webhooks = _webhooks(
            raw.pop("webhooks", None), raw.pop("webhook_url", None), raw.pop("webhook_secret", None), env
        )
        unknown = sorted(set(raw) - set(_FIELDS))
        if unknown:
            raise ConfigError(
                f"{unknown[0]}: unknown setting in {path}; known settings are {', '.join(_FIELDS)}, "
                "webhook_url, webhook_secret, [pricing], [[webhooks]]"
            )
        values: dict[str, Any] = {}
        for name, (cast, default) in _FIELDS.items():
            env_name = f"GATEWAY_{name.upper()}"
            flag = (flags or {}).get(name)
            if flag is not None:
                values[name] = cast(f"--{name.replace('_', '-')}", flag)
            elif env_name in env and env[env_name] != "":
                values[name] = cast(env_name, env[env_name])
            elif name in raw:
                values[name] = cast(name, raw[name])
            else:
                values[name] = default
        for name in ("upstream_api_key", "admin_token"):
            if values[name] is not None:
                values[name] = Secret(values[name])
        if values["hold_ttl_seconds"] <= values["upstream_timeout_seconds"]:
            raise ConfigError(
                f"GATEWAY_HOLD_TTL_SECONDS ({values['hold_ttl_seconds']:g}) must be greater than "
                f"GATEWAY_UPSTREAM_TIMEOUT_SECONDS ({values['upstream_timeout_seconds']:g}), "
                "or live requests would lose their holds"
            )
        try:
            values["pricing"] = PriceTable.from_config(pricing)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return cls(**values, webhooks=webhooks)
