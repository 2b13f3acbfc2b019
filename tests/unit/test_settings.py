from __future__ import annotations

from pathlib import Path

import pytest

from gpumeter.errors import ConfigError
from gpumeter.settings import load_settings


def test_defaults_are_embedded_under_home(tmp_path: Path) -> None:
    s = load_settings(environ={"GPUMETER_HOME": str(tmp_path)})
    assert s.clickhouse_dsn_resolved == f"chdb://{tmp_path.resolve()}/clickhouse"
    assert s.billing_db_resolved == f"sqlite:///{tmp_path.resolve()}/billing.sqlite3"
    assert s.topic == "gpumeter.usage.v1"


def test_flag_beats_environment_beats_config_file(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        'kafka_bootstrap = "file:1"\nclickhouse_dsn = "http://ch:8123"\ntopic = "from-file"\n'
    )
    env = {"GPUMETER_HOME": str(tmp_path), "GPUMETER_KAFKA_BOOTSTRAP": "env:2", "GPUMETER_TOPIC": "from-env"}
    s = load_settings(environ=env, topic="from-flag")
    assert (s.kafka_bootstrap, s.clickhouse_dsn, s.topic) == ("env:2", "http://ch:8123", "from-flag")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kafka = 1\n", "unknown setting(s) kafka"),
        ("topic = 5\n", "setting(s) topic must be strings"),
        ("topic = \n", "not valid TOML"),
    ],
)
def test_bad_config_file_says_which_file_and_why(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(config=cfg, environ={"GPUMETER_HOME": str(tmp_path)})
    assert str(err.value).startswith(f"{cfg}: ")
    assert message in str(err.value)


def test_named_config_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(config=tmp_path / "nope.toml", environ={})
