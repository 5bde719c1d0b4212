"""Example configs shipped with recops: ``sweep_demo.yaml`` (the demo's sweep, fits 2 cores) and
``sweep_gpu.yaml`` (a GPU Ray cluster). Installed as ``recops.configs``; :func:`config_path` finds one."""

from __future__ import annotations

from pathlib import Path

from recops.errors import RecopsError


def config_path(name: str) -> Path:
    """The shipped config file ``name`` (e.g. ``sweep_demo.yaml``)."""
    path = Path(__file__).with_name(name)
    if not path.is_file():
        shipped = sorted(p.name for p in Path(__file__).parent.glob("*.yaml"))
        raise RecopsError(f"no shipped config {name!r}; shipped: {shipped}")
    return path
