"""Run-config parsing: defaults from pyproject, scenarios, unknown keys and wrong types."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared_model.config import (
    ConfigError,
    ModelConfig,
    load_defaults,
    load_scenario,
    merge_overrides,
    parse_run_config,
)

SCENARIOS = sorted(p.stem for p in (Path(__file__).parent.parent / "simulations" / "scenarios").glob("*.toml"))


def test_defaults_parse_and_round_trip() -> None:
    s = parse_run_config(load_defaults())
    assert s.model.fusion in ("concat", "gated", "attention")
    assert parse_run_config(s.to_flat()) == s


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_scenario_parses(name: str) -> None:
    overrides = load_scenario(name)
    settings = parse_run_config(merge_overrides(load_defaults(), overrides, name))
    parsed = settings.to_flat()
    assert overrides  # a scenario overrides something
    for key, value in overrides.items():  # every override reaches the parsed settings unchanged
        assert parsed[key] == value, key


def test_unknown_key_is_rejected_with_its_name() -> None:
    with pytest.raises(ConfigError, match="train.lrr"):
        merge_overrides(load_defaults(), {"train.lrr": 0.1})
    with pytest.raises(ConfigError, match="model.fusoin"):
        parse_run_config({"model.fusoin": "gated"})


def test_wrong_type_is_rejected() -> None:
    with pytest.raises(ConfigError, match="train.local-epochs"):
        merge_overrides(load_defaults(), {"train.local-epochs": "two"})
    with pytest.raises(ConfigError, match="model.fusion"):
        ModelConfig(fusion="sum")


def test_missing_scenario_lists_available() -> None:
    with pytest.raises(ConfigError, match="smoke"):
        load_scenario("no-such-scenario")


def test_pyproject_declares_every_run_config_key() -> None:
    defaults = load_defaults()
    flat = parse_run_config(defaults).to_flat()
    assert set(flat) == set(defaults)
    assert flat == {k: (float(v) if isinstance(flat[k], float) else v) for k, v in defaults.items()}


def test_strategy_names_match_the_strategies_built_by_the_server() -> None:
    from server.strategies import STRATEGIES
    from shared_model.config import STRATEGY_NAMES

    assert set(STRATEGY_NAMES) == set(STRATEGIES)


def test_unknown_strategy_is_refused_when_the_config_is_parsed() -> None:
    import pytest

    from shared_model.config import ConfigError, parse_run_config

    with pytest.raises(ConfigError, match="strategy.name: 'fedsgd'"):
        parse_run_config({"strategy.name": "fedsgd"})
