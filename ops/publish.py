"""Registered models into the Triton repository and into deployments, with one identity chain.

Every exported version's ``export.json`` carries a ``ModelLineage`` (registry version, checkpoint fingerprint,
training dataset root + version, Triton name/version/repository), and the registry records where each of its
versions is served (``exported``, then ``production`` / ``canary`` / ``retired`` as deployments move). A checkpoint
exported directly is registered first (found again by its fingerprint), so every served version answers "which
registry version, trained on what" in one lookup.
"""

from __future__ import annotations

from pathlib import Path

from recops.errors import RecopsError
from recops.ops.loop_state import ModelRef
from recops.ops.registry import Lineage, ModelRegistry, ModelVersion
from recops.serving.deploy import DeployState, read_deploy_state
from recops.serving.export import ExportConfig, PublishResult, export_to_repository
from recops.serving.onnx_model import ExportRecord, ModelLineage
from recops.serving.repository import ModelRepository, ServingOptions
from recops.training.checkpoint import Checkpoint
from recops.training.dataset import Dataset
from recops.training.environment import capture


def environment_lineage(**fields) -> Lineage:
    """A lineage stamped with this process's code version, libraries and hardware."""
    env = capture()
    return Lineage(code=env.code, libraries=env.libraries, hardware=env.hardware, **fields)


def register_checkpoint(
    registry: ModelRegistry,
    checkpoint: Checkpoint,
    metrics: dict[str, float] | None = None,
    params: dict | None = None,
    lineage: Lineage | None = None,
) -> ModelVersion:
    """Register ``checkpoint`` (metrics by default: its best epoch's, named by split; params: its configs)."""
    if metrics is None:
        metrics = {k: v for k, v in checkpoint.meta.metrics.items() if k.startswith("val_") and v is not None}
    params = params if params is not None else {"model": _arch(checkpoint), "train": checkpoint.meta.train.to_dict()}
    return registry.register(
        checkpoint.path,
        metrics,
        params,
        checkpoint.meta.dataset,
        lineage or environment_lineage(),
        checkpoint.fingerprint,
    )


def _arch(checkpoint: Checkpoint) -> dict:
    return {k: v for k, v in checkpoint.meta.model.to_dict().items() if k != "tables"}


def registered(registry: ModelRegistry, checkpoint: Checkpoint) -> ModelVersion:
    """The registry version of ``checkpoint`` (by fingerprint), registered now if it has none."""
    return registry.find(checkpoint.fingerprint) or register_checkpoint(registry, checkpoint)


def lineage_of(registry: ModelRegistry, model: ModelVersion) -> ModelLineage:
    fingerprint = model.fingerprint or Checkpoint.open(model.checkpoint).fingerprint
    return ModelLineage(
        str(model.checkpoint),
        fingerprint,
        model.dataset,
        model.version,
        str(Path(getattr(registry, "root", "")).resolve()),
    )


def publish_model(
    registry: ModelRegistry,
    model: ModelVersion,
    repo: ModelRepository,
    name: str,
    target: str | None = None,
    config: ExportConfig | None = None,
    options: ServingOptions | None = None,
    dataset: Path | str | None = None,
    version: int | None = None,
) -> PublishResult:
    """Export registered ``model`` as a version of ``name`` (behind the parity gate) and record it as served."""
    result = export_to_repository(
        model.checkpoint,
        repo,
        name,
        target=target,
        config=config,
        options=options,
        dataset=dataset,
        lineage=lineage_of(registry, model),
        version=version,
    )
    registry.record_served(model.version, str(repo.root.resolve()), name, result.version, "exported")
    return result


def served_lineage(repo: ModelRepository, name: str, version: int) -> ModelLineage | None:
    """The lineage recorded in a repository version's ``export.json`` (None without one)."""
    record = ExportRecord.read(repo.model_dir(name) / str(version))
    return record.lineage if record else None


def served_registry_version(registry: ModelRegistry, repo: ModelRepository, name: str, version: int) -> int | None:
    """The registry version a repository version was exported from (by its lineage, else its fingerprint)."""
    lineage = served_lineage(repo, name, version)
    if lineage is None:
        return None
    if lineage.registry_version is not None:
        return lineage.registry_version
    found = registry.find(lineage.fingerprint)
    return found.version if found else None


def record_deployment(
    registry: ModelRegistry, repo: ModelRepository, name: str, before: DeployState, after: DeployState
) -> None:
    """Tell the registry which of its versions a deployment change made production, canary or retired."""
    statuses = {v: "retired" for v in before.loaded if v not in after.loaded}
    statuses.update({v: s for v, s in ((after.production, "production"), (after.canary, "canary")) if v is not None})
    for served, status in statuses.items():
        registry_version = served_registry_version(registry, repo, name, served)
        if registry_version is not None:
            registry.record_served(registry_version, str(repo.root.resolve()), name, served, status)


def production_model(
    repo: ModelRepository, registry: ModelRegistry, name: str, datasets: Path, start_ts: float
) -> ModelRef:
    """The version the deployment record calls production, traced through its export's lineage to its registry
    version, checkpoint and dataset (a dataset moved since is looked for under ``datasets``)."""
    production = read_deploy_state(repo, name).production
    if production is None:
        raise RecopsError(
            f"model {name!r} has no production version in {repo.root}; deploy one first "
            f"(`recops deploy --name {name} --version V --repo {repo.root}`)"
        )
    lineage = served_lineage(repo, name, production)
    if lineage is None:
        raise RecopsError(f"{name} version {production} has no export.json; export it with `recops export`")
    registered = served_registry_version(registry, repo, name, production)
    dataset = lineage.dataset.path if lineage.dataset.path.is_dir() else Path(datasets) / lineage.dataset.version
    return ModelRef(production, registered, str(Dataset.open(dataset).path), lineage.checkpoint, 0, start_ts)
