"""Settings: TOML plus environment, and one clear line for every bad configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.ops.cli import main
from gateway.ops.settings import ConfigError, Settings


def test_defaults_match_the_contract() -> None:
    s = Settings.load(environ={})
    assert (s.host, s.port, s.database_url) == ("127.0.0.1", 8080, "sqlite+aiosqlite:///gateway.db")
    assert s.upstream_url == "https://axerity.com/api/v1/chat"
    assert (s.upstream_timeout_seconds, s.hold_ttl_seconds, s.max_body_bytes) == (300, 360, 4194304)
    assert s.admin_token is None and s.upstream_api_key is None


def test_environment_overrides_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('port = 9000\nupstream_api_key = "from-file"\n[pricing]\n"acme/x" = 0.5\n')
    s = Settings.load(config, environ={"GATEWAY_PORT": "9100"})
    assert s.port == 9100
    assert str(s.upstream_api_key) == "from-file"
    assert "from-file" not in repr(s)
    assert s.pricing.unit_price("acme/x") == 500_000
    assert Settings.load(environ={"GATEWAY_CONFIG": str(config)}).port == 9000


@pytest.mark.parametrize(
    ("toml", "env", "names"),
    [
        ("colour = 'blue'\n", {}, "colour"),
        ("", {"GATEWAY_UPSTREAM_URL": "not a url"}, "GATEWAY_UPSTREAM_URL"),
        ("", {"GATEWAY_DATABASE_URL": "mysql://x/y"}, "GATEWAY_DATABASE_URL"),
        ("[pricing]\n'openai/gpt-oss-20b' = -1\n", {}, "pricing"),
        ("[pricing]\n'openai/gpt-oss-20b' = 0.0000001\n", {}, "pricing"),
        ("", {"GATEWAY_HOLD_TTL_SECONDS": "100"}, "GATEWAY_HOLD_TTL_SECONDS"),
        ("", {"GATEWAY_PORT": "eighty"}, "GATEWAY_PORT"),
        ("", {"GATEWAY_MAX_BODY_BYTES": "-5"}, "GATEWAY_MAX_BODY_BYTES"),
        ("port = [\n", {}, "gateway.toml"),
    ],
)
def test_bad_configuration_is_one_clear_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    toml: str,
    env: dict[str, str],
    names: str,
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError, match=names):
        Settings.load(config, environ=env)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert names in err and "Traceback" not in err


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["serve", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
