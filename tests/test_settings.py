"""Default locations come from one settings object, one environment variable each."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from recops.ops.registry import LocalRegistry
from recops.serving.server import ServerConfig
from recops.settings import ENVIRONMENT, Settings, settings
from recops.training.sweep_config import SweepConfig


def test_every_setting_has_one_variable_and_a_relative_default() -> None:
    names = {f.name for f in dataclasses.fields(Settings)}
    assert names == set(ENVIRONMENT)
    assert len({var for var, _ in ENVIRONMENT.values()}) == len(names)
    defaults = Settings.from_env({})
    assert all(not getattr(defaults, n).is_absolute() for n in names)
    assert defaults.model_repository == Path("triton_models") and defaults.datasets == Path("runs/datasets")


def test_each_variable_overrides_its_setting_only(tmp_path: Path) -> None:
    for name, (var, _) in ENVIRONMENT.items():
        got = Settings.from_env({var: str(tmp_path / name)})
        assert getattr(got, name) == tmp_path / name
        others = {n for n in ENVIRONMENT if n != name}
        assert all(getattr(got, n) == Path(ENVIRONMENT[n][1]) for n in others)


def test_users_of_the_defaults_read_them_when_called(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RECOPS_MODEL_REPOSITORY", str(tmp_path / "repo"))
    monkeypatch.setenv("RECOPS_REGISTRY", str(tmp_path / "reg"))
    monkeypatch.setenv("RECOPS_SWEEPS", str(tmp_path / "sweeps"))
    assert settings().model_repository == tmp_path / "repo"
    assert ServerConfig().repo == tmp_path / "repo"
    assert LocalRegistry().root == tmp_path / "reg"
    field = next(f for f in dataclasses.fields(SweepConfig) if f.name == "storage_path")
    assert field.default_factory() == tmp_path / "sweeps"
