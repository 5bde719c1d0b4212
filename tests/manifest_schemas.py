"""Offline validators for the rendered manifests (tests/data/schemas/README.md says which schema is from where)."""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
from referencing import Registry, Resource

KUBERNETES_VERSION = "1.32.0"
SCHEMAS = Path(__file__).parent / "data" / "schemas"
CORE_GROUPS = ("v1", "apps/v1")


def _strict(node: Any) -> Any:
    """A pydantic-generated JSON Schema made as strict as the CRD under strict field validation: objects with
    listed properties reject others, and optional fields do not accept null."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: (value if key == "properties" else _strict(value)) for key, value in node.items()}
    if "properties" in node:
        node["properties"] = {name: _strict(schema) for name, schema in node["properties"].items()}
        node.setdefault("additionalProperties", False)
    if "anyOf" in node:
        options = [option for option in node["anyOf"] if option != {"type": "null"}]
        node.pop("anyOf")
        node.pop("default", None)
        node = {**node, **options[0]} if len(options) == 1 else {**node, "anyOf": options}
    return node


@functools.cache
def prometheus_operator_schema(kind: str) -> dict[str, Any]:
    """``kind``'s (or ``PrometheusRuleSpec``'s) JSON Schema from the CRD-generated models, made strict."""
    from cloudcoil.models.prometheus_operator import v1

    if kind == "PrometheusRuleSpec":
        rule = v1.PrometheusRule.model_json_schema(by_alias=True)
        return _strict({**rule["$defs"]["PrometheusRuleSpec"], "$defs": rule["$defs"]})
    return _strict(getattr(v1, kind).model_json_schema(by_alias=True))


@functools.cache
def _kubernetes_registry() -> Registry:
    """Kubernetes' strict definitions (kubernetes-validate) and the schemas in tests/data/schemas."""
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}-local-strict"
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ Registry()
    for path in SCHEMAS.glob("*.json"):
        schema = json.loads(path.read_text())
        registry = registry.with_resource(schema["$id"], Resource.from_contents(schema))
    return registry


def _file_schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


def _check(schema: dict[str, Any], document: Any) -> None:
    jsonschema.Draft202012Validator(schema, registry=_kubernetes_registry()).validate(document)


CRDS = {
    "ServiceMonitor": lambda: prometheus_operator_schema("ServiceMonitor"),
    "PrometheusRule": lambda: prometheus_operator_schema("PrometheusRule"),
    "RayCluster": lambda: _file_schema("raycluster.json"),
    "RayJob": lambda: _file_schema("rayjob.json"),
}


def validate_object(document: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError unless ``document`` is a valid object of its kind."""
    if document.get("apiVersion") in CORE_GROUPS:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    else:
        _check(CRDS[document["kind"]](), document)


def validate_prometheus_config(document: dict[str, Any]) -> None:
    _check(_file_schema("prometheus-config.json"), document)


def validate_rules_file(document: dict[str, Any]) -> None:
    """A Prometheus rules file has the PrometheusRule spec's shape (the operator writes one from it)."""
    _check(prometheus_operator_schema("PrometheusRuleSpec"), document)
