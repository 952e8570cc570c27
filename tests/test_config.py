"""Settings: rate parsing, precedence flags > env > TOML > defaults, safety checks, `capbatch config`."""

from __future__ import annotations

from pathlib import Path

import pytest

from capbatch.config import Rate, parse_rate, resolve, target_url
from capbatch.errors import ConfigError, UsageError


@pytest.mark.parametrize("text,expected", [
    ("1000/min", Rate(1000, 60)), ("20/s", Rate(20, 1)), ("5000/h", Rate(5000, 3600)),
    ("20 / sec", Rate(20, 1)), ("100/5min", Rate(100, 300)), ("unlimited", None), ("none", None),
])
def test_parse_rate(text, expected):
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["fast", "10", "-5/s", "10/fortnight", "0/s"])
def test_bad_rates_name_the_fix(text):
    with pytest.raises(UsageError) as exc:
        parse_rate(text)
    if text != "0/s":
        assert "1000/min" in str(exc.value)


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path):
    cfg = tmp_path / "capbatch.toml"
    cfg.write_text('[capbatch]\nrate = "600/min"\nconcurrency = 4\ncluster = "eu"\nmax_attempts = 3\n')
    env = {"CAPBATCH_CONCURRENCY": "8", "CAPBATCH_RATE": "10/s"}
    s = resolve({"rate": "20/s"}, env, cfg)
    assert s.rate == Rate(20, 1) and s.sources["rate"] == "flag"
    assert s.concurrency == 8 and s.sources["concurrency"] == "env CAPBATCH_CONCURRENCY"
    assert s.max_attempts == 3 and s.sources["max_attempts"].startswith("file ")
    assert s.cluster == "eu"
    assert s.timeout == 30.0 and "timeout" not in s.sources


def test_default_config_file_is_picked_up_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "capbatch.toml").write_text("concurrency = 5\n")
    monkeypatch.chdir(tmp_path)
    assert resolve({}, {}).concurrency == 5


def test_config_file_refuses_secrets_and_unknown_keys(tmp_path):
    bad = tmp_path / "a.toml"
    bad.write_text('password = "x"\n')
    with pytest.raises(ConfigError, match="unknown settings|secrets"):
        resolve({}, {}, bad)
    bad.write_text('concurency = 3\n')
    with pytest.raises(ConfigError, match="unknown settings: concurency"):
        resolve({}, {}, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve({}, {}, tmp_path / "missing.toml")


def test_plain_http_only_to_loopback_unless_allowed():
    assert target_url(resolve({"base_url": "http://127.0.0.1:8080/"}, {})) == "http://127.0.0.1:8080"
    assert target_url(resolve({"base_url": "http://localhost:1"}, {})) == "http://localhost:1"
    with pytest.raises(UsageError, match="refusing plain http"):
        target_url(resolve({"base_url": "http://api.example.com"}, {}))
    assert target_url(resolve({"base_url": "http://api.example.com", "allow_http": True}, {}))
    assert target_url(resolve({"cluster": "eu"}, {})) == "https://eu.api.capillarytech.com"
    assert target_url(resolve({"cluster": "cn"}, {})) == "https://api.capillarytech.cn.com"


def test_secrets_never_appear_in_public_settings():
    s = resolve({}, {"CAPILLARY_USERNAME": "till", "CAPILLARY_PASSWORD": "hunter2-secret"})
    assert s.credentials.kind == "basic"
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.public_dict())


def test_config_command_masks_credentials_and_names_sources(tmp_path, run_cli):
    from conftest import cli_env

    (tmp_path / "capbatch.toml").write_text('rate = "600/min"\n')
    env = cli_env(CAPILLARY_CLIENT_KEY="key-abcdef123", CAPILLARY_CLIENT_SECRET="topsecret-value",
                  CAPBATCH_CONCURRENCY="7")
    p = run_cli("config", env=env)
    assert p.returncode == 0, p.stderr
    assert "topsecret" not in p.stdout and "key-abcdef123" not in p.stdout
    assert "600/min" in p.stdout and "capbatch.toml" in p.stdout
    assert "env CAPBATCH_CONCURRENCY" in p.stdout
    assert "OAuth" in p.stdout


def test_settings_path_types(tmp_path):
    s = resolve({"run_dir": str(tmp_path / "x"), "sheet": "2"}, {})
    assert isinstance(s.run_dir, Path) and s.sheet == 2


def test_a_cluster_flag_beats_a_base_url_from_the_file_and_both_flags_is_an_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('base_url = "https://eu.api.capillarytech.com"\n')
    s = resolve({"cluster": "us"}, {}, cfg)
    assert target_url(s) == "https://us.api.capillarytech.com"
    s = resolve({"base_url": "http://127.0.0.1:9"}, {"CAPBATCH_CLUSTER": "eu"})
    assert target_url(s) == "http://127.0.0.1:9"
    with pytest.raises(UsageError, match="give one of"):
        resolve({"cluster": "us", "base_url": "http://127.0.0.1:9"}, {})


def test_base_url_secrets_are_refused_and_redacted():
    with pytest.raises(UsageError, match="credentials or a query string"):
        target_url(resolve({"base_url": "https://u:pw@eu.api.capillarytech.com"}, {}))
    shown = resolve({}, {"CAPBATCH_BASE_URL": "https://u:pw@host.example/api?key=abc"}).public_dict()["base_url"]
    assert "pw" not in shown and "abc" not in shown


def test_a_negative_flag_beats_a_true_setting_in_the_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("strip_invisible = true\ngenerate_missing = true\n")
    s = resolve({"strip_invisible": False}, {}, cfg)
    assert s.strip_invisible is False and s.sources["strip_invisible"] == "flag"
    assert s.generate_missing is True
