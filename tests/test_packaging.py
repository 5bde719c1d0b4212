"""The distribution: one import root, package data shipped, the declared entry point."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return zipfile.ZipFile(next(out.glob("recops-*.whl")))


def test_the_wheel_installs_only_the_recops_import_root(wheel: zipfile.ZipFile) -> None:
    tops = {name.split("/", 1)[0] for name in wheel.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"recops"}
    modules = {n for n in wheel.namelist() if n.endswith(".py")}
    for expected in (
        "recops/cli/__init__.py",
        "recops/training/train.py",
        "recops/serving/export.py",
        "recops/ops/loop.py",
        "recops/bench/suite.py",
        "recops/configs/__init__.py",
    ):
        assert expected in modules
    assert not any(n.startswith("recops/tests/") for n in wheel.namelist())


def test_package_data_ships_with_it(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert {
        "recops/configs/sweep_demo.yaml",
        "recops/configs/sweep_gpu.yaml",
        "recops/ops/dashboards/recops_grafana.json",
        "recops/serving/triton_python_model.py",
        "recops/deploy/values.yaml",
        "recops/triton_models/raw_preprocess.py",  # the raw-feature model's steps, copied into every repository
        "recops/triton_models/raw_score.py",
        "recops/triton_models/README.md",
    } <= names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "recops = recops.cli:main" in wheel.read(entry).decode()
