"""Settings come from SJAAK_* variables, once, with clear errors."""

from __future__ import annotations

import pytest

from api.config import SettingsError, load_settings


def test_defaults_need_no_environment() -> None:
    settings = load_settings({})
    assert settings.database_url is None
    assert settings.port == 8000
    assert settings.data_dir == ".data"


def test_variables_are_converted() -> None:
    settings = load_settings(
        {
            "SJAAK_DATABASE_URL": "postgresql://db.internal/sjaak",
            "SJAAK_PORT": "9001",
            "SJAAK_WORKERS": "4",
            "SJAAK_SEED_DEMO": "false",
            "OTHER_VARIABLE": "ignored",
        }
    )
    assert settings.database_url == "postgresql://db.internal/sjaak"
    assert settings.port == 9001
    assert settings.workers == 4
    assert settings.seed_demo is False


def test_an_empty_database_url_means_embedded() -> None:
    assert load_settings({"SJAAK_DATABASE_URL": ""}).database_url is None


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("SJAAK_PORT", "eighty", "port"),
        ("SJAAK_PORT", "70000", "SJAAK_PORT must be 1..65535"),
        ("SJAAK_LOG_LEVEL", "LOUD", "log_level"),
        ("SJAAK_WORKERS", "0", "must be >= 1"),
    ],
)
def test_bad_values_are_refused_with_the_variable_named(
    variable: str, value: str, message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings({variable: value})
