"""Render every manifest from one :class:`~recops.deploy.values.Values` and write them to a directory."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml

from recops.deploy import kuberay, monitoring, workloads
from recops.deploy.objects import Object
from recops.deploy.values import Values

# File -> what it holds. core/ needs nothing but a cluster with GPUs; monitoring/ the Prometheus operator;
# ray/ the KubeRay operator; prometheus/ is configuration for a Prometheus without the operator, not objects.
# Numbered prefixes make `kubectl apply -f core/` create the namespace and volumes first.
MANIFESTS: dict[str, Callable[[Values], list[Object]]] = {
    "core/00-namespace.yaml": workloads.namespace,
    "core/10-storage.yaml": workloads.claims,
    "core/20-triton.yaml": workloads.triton,
    "core/30-loop.yaml": workloads.loop,
    "monitoring/servicemonitors.yaml": monitoring.service_monitors,
    "monitoring/prometheusrule.yaml": monitoring.prometheus_rule,
    "ray/00-sweep-config.yaml": kuberay.sweep_config_map,
    "ray/10-raycluster.yaml": kuberay.ray_cluster,
    "ray/20-rayjob-sweep.yaml": kuberay.ray_job,
    "prometheus/prometheus.yml": monitoring.prometheus_config,
    f"prometheus/{monitoring.RULES_FILE}": monitoring.rules_file,
}
HEADER = "# Rendered by `recops manifests` from one set of values; edit the values and render again.\n"


def render(values: Values) -> dict[str, list[Object]]:
    """Relative file path -> the documents it holds."""
    return {path: build(values) for path, build in MANIFESTS.items()}


class _Dumper(yaml.SafeDumper):
    """Plain YAML for kubectl and people: no anchors for shared pieces, multi-line strings as blocks."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _str)


def to_yaml(documents: list[Object]) -> str:
    return HEADER + yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, width=1000)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifests(out: Path | str, values: Values) -> list[Path]:
    """Render everything first (so bad values write nothing), then write each file atomically; the paths written."""
    rendered = {Path(out) / path: to_yaml(documents) for path, documents in render(values).items()}
    for path, text in rendered.items():
        _write_atomic(path, text)
    return list(rendered)
