"""Checkpoint -> ONNX, gated on parity with the TorchRec model, then into a Triton model repository.

``export_onnx`` writes ``model.onnx`` (+ ``model.onnx.data`` for large models or on request), the
checkpoint's ``preprocess.json`` and ``export.json`` (layout, exporter, parity) into a directory.
``check_parity`` compares ONNX Runtime with the real TorchRec DLRM (EmbeddingBagCollection + KJT) on fresh
random inputs and on a dataset's val split; ``publish`` runs the gate and only then calls
``ModelRepository.add_version``, so a failed gate leaves the repository untouched. ``export_to_repository``
is the whole path through a staging directory inside the repository.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recops.errors import RecopsError
from recops.files import remove_stale, staging_dir, write_json_atomic
from recops.serving.deploy import deploy_lock, served_policy
from recops.serving.inference_module import InferenceDLRM, load_torchrec, torchrec_probabilities
from recops.serving.onnx_model import (
    EXPORT_FILE,
    OUTPUT_NAME,
    PREPROCESS_FILE,
    ExportRecord,
    FeatureLayout,
    ModelLineage,
    onnx_probabilities,
    onnx_session,
)
from recops.serving.raw_model import check_compatible, check_raw_names, write_raw_model
from recops.serving.repository import ONNX_FILE, ModelRepository, ServingOptions, validate_model_name
from recops.training.checkpoint import Checkpoint
from recops.training.dataset import Dataset
from recops.training.metrics import auc

FP32_TOLERANCE = 1e-5
FP16_TOLERANCE = 1e-2


class ParityError(RecopsError):
    """The exported model does not reproduce the TorchRec model; ``report`` says by how much and where."""

    def __init__(self, message: str, report: ParityReport):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ExportConfig:
    """How to export: FP16 weights and compute (GPU targets), external weight data (None = above threshold)."""

    fp16: bool = False
    external_data: bool | None = None
    external_threshold_bytes: int = 1 << 30
    example_batch: int = 4


@dataclass(frozen=True)
class ParityConfig:
    """The gate: max |ONNX - TorchRec| on random rows and the val split, and |AUC difference| on the val split.

    ``tolerance`` None = 1e-5 for float32, 1e-2 for FP16 exports. ``auc_tolerance`` 5e-5 = equal to 4 decimals
    (compared as a difference, so two AUCs that straddle a rounding boundary do not fail).
    """

    random_rows: int = 4096
    eval_rows: int = 100_000
    seed: int = 0
    tolerance: float | None = None
    auc_tolerance: float = 5e-5
    fp16_auc_tolerance: float = 1e-3


@dataclass(frozen=True)
class ParityReport:
    """What the gate measured (AUCs are None when no dataset was given)."""

    max_abs_diff: float
    where: str
    random_max_abs_diff: float
    eval_max_abs_diff: float | None
    auc_torch: float | None
    auc_onnx: float | None
    rows_random: int
    rows_eval: int
    tolerance: float
    auc_tolerance: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ExportedModel:
    """An export directory: ``model.onnx`` (+ external data), ``preprocess.json`` and ``export.json``."""

    directory: Path
    record: ExportRecord
    checkpoint: Checkpoint = field(repr=False)

    @property
    def onnx_path(self) -> Path:
        return self.directory / ONNX_FILE

    @property
    def layout(self) -> FeatureLayout:
        return self.record.layout

    @property
    def extra_files(self) -> list[Path]:
        return [self.directory / PREPROCESS_FILE, self.directory / EXPORT_FILE]


@dataclass(frozen=True)
class PublishResult:
    """A gated version in the repository, and the raw-feature model serving it (``recops.serving.raw_model``)."""

    name: str
    version: int
    onnx_path: Path
    parity: ParityReport
    record: ExportRecord
    raw_model: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "raw_model": self.raw_model,
            "version": self.version,
            "onnx_path": str(self.onnx_path),
            "exporter": self.record.exporter,
            "fp16": self.record.fp16,
            "external_data": self.record.external_data,
            "parity_max_abs_diff": self.parity.max_abs_diff,
            "parity_auc": {"torch": self.parity.auc_torch, "onnx": self.parity.auc_onnx},
            "inputs": [s.to_dict() for s in self.record.inputs],
            "lineage": self.record.lineage.to_dict(),
        }


def inference_module(ckpt: Checkpoint, fp16: bool = False) -> tuple[InferenceDLRM, FeatureLayout]:
    layout = FeatureLayout.of(ckpt.meta.model, ckpt.meta.features.spec)
    return InferenceDLRM(ckpt.meta.model, layout, ckpt.load(optim=False).model, fp16=fp16), layout


def _onnx_export(
    module: torch.nn.Module, example: tuple[torch.Tensor, ...], names: list[str], path: Path, external: bool
) -> str:
    """Export with the dynamo exporter (dynamic batch); fall back to TorchScript. Returns the exporter used."""
    batch = torch.export.Dim("batch")
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                example,
                None,
                dynamo=True,
                input_names=names,
                output_names=[OUTPUT_NAME],
                dynamic_shapes=(tuple({0: batch} for _ in names),),
                verbose=False,
            )
        program.save(str(path), external_data=external)
        return "dynamo"
    except Exception as dynamo_exc:  # noqa: BLE001 - any exporter failure: try the other exporter
        dynamo_error = dynamo_exc
    finally:
        quiet.setLevel(level)
    try:
        _torchscript_export(module, example, names, path, external)
    except Exception as exc:
        raise RecopsError(
            f"ONNX export failed with both exporters: dynamo ({dynamo_error}); torchscript ({exc})"
        ) from exc
    return "torchscript"


def _torchscript_export(
    module: torch.nn.Module, example: tuple[torch.Tensor, ...], names: list[str], path: Path, external: bool
) -> None:
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=False,
            input_names=names,
            output_names=[OUTPUT_NAME],
            dynamic_axes={n: {0: "batch"} for n in [*names, OUTPUT_NAME]},
        )
    if external:
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data")


def export_onnx(
    checkpoint: Checkpoint | Path | str,
    out_dir: Path | str,
    config: ExportConfig = ExportConfig(),
    lineage: ModelLineage | None = None,
) -> ExportedModel:
    """Write ``model.onnx`` (+ data), ``preprocess.json`` and ``export.json`` (no parity yet) into ``out_dir``.

    ``lineage`` says which registered model this is (default: the checkpoint and its dataset, no registry version).
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.open(checkpoint)
    module, layout = inference_module(ckpt, config.fp16)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    external = config.external_data if config.external_data is not None else size > config.external_threshold_bytes
    specs = layout.input_specs()
    example = layout.random_inputs(config.example_batch, np.random.default_rng(0))
    exporter = _onnx_export(
        module,
        tuple(torch.from_numpy(example[s.name]) for s in specs),
        [s.name for s in specs],
        out / ONNX_FILE,
        external,
    )
    lineage = lineage or ModelLineage(str(ckpt.path), ckpt.fingerprint, ckpt.meta.dataset)
    record = ExportRecord(layout, exporter, config.fp16, external, lineage)
    write_json_atomic(out / PREPROCESS_FILE, ckpt.meta.preprocessor)
    record.write(out)
    return ExportedModel(out, record, ckpt)


def _max_diff(torch_p: np.ndarray, onnx_p: np.ndarray, what: str) -> tuple[float, str]:
    diff = np.abs(torch_p.astype(np.float64) - onnx_p.astype(np.float64)).ravel()
    bad = np.flatnonzero(~np.isfinite(diff))
    if bad.size:
        return float(
            "inf"
        ), f"{what} row {bad[0]} (non-finite output: torch {torch_p.ravel()[bad[0]]}, onnx {onnx_p.ravel()[bad[0]]})"
    row = int(diff.argmax())
    return float(diff[row]), f"{what} row {row} (torch {torch_p.ravel()[row]:.7g}, onnx {onnx_p.ravel()[row]:.7g})"


def check_parity(
    exported: ExportedModel, dataset: Path | str | None = None, config: ParityConfig = ParityConfig()
) -> ParityReport:
    """Compare ONNX Runtime on ``exported`` with the checkpoint's TorchRec model; raise ParityError on failure."""
    reference = load_torchrec(exported.checkpoint)
    session = onnx_session(exported.onnx_path, device="cpu")  # like for like: the TorchRec reference runs on CPU
    tolerance = (
        config.tolerance if config.tolerance is not None else FP16_TOLERANCE if exported.record.fp16 else FP32_TOLERANCE
    )
    auc_tolerance = config.fp16_auc_tolerance if exported.record.fp16 else config.auc_tolerance
    layout = exported.layout
    random_inputs = layout.random_inputs(config.random_rows, np.random.default_rng(config.seed))
    random_diff, where = _max_diff(
        torchrec_probabilities(reference, layout, random_inputs), onnx_probabilities(session, random_inputs), "random"
    )
    eval_diff, auc_t, auc_o, rows_eval = None, None, None, 0
    if dataset is not None:
        val = Dataset.open(dataset).split("val")
        rows_eval = min(len(val), config.eval_rows)
        inputs = layout.features_inputs(
            val.dense[:rows_eval], val.sparse[:rows_eval], {k: v[:rows_eval] for k, v in val.multi.items()}
        )
        torch_p, onnx_p = torchrec_probabilities(reference, layout, inputs), onnx_probabilities(session, inputs)
        eval_diff, eval_where = _max_diff(torch_p, onnx_p, "val")
        if not eval_diff <= random_diff:
            where = eval_where
        labels = np.asarray(val.label[:rows_eval])
        auc_t, auc_o = auc(labels, torch_p), auc(labels, onnx_p)
    worst = max(random_diff, eval_diff if eval_diff is not None else 0.0)
    auc_ok = auc_t is None or abs(auc_t - auc_o) <= auc_tolerance
    report = ParityReport(
        worst,
        where,
        random_diff,
        eval_diff,
        auc_t,
        auc_o,
        config.random_rows,
        rows_eval,
        tolerance,
        auc_tolerance,
        bool(worst <= tolerance and auc_ok),
    )
    if not report.passed:
        raise ParityError(
            f"parity gate failed for {exported.onnx_path}: max |onnx - torchrec| = {worst:.3g} "
            f"(tolerance {tolerance:g}) at {where}; val AUC torch {auc_t} vs onnx {auc_o} "
            f"(tolerance {auc_tolerance:g}); nothing was written to the model repository. Check the export "
            "(ids in range, same checkpoint) or raise the tolerance for FP16",
            report,
        )
    return report


def current_options(repo: ModelRepository, name: str) -> ServingOptions:
    """The serving options ``name`` is published with when none are given: its stored ones (a new model's:
    ``ServingOptions()``)."""
    return repo.settings(name)[1]


def publish(
    exported: ExportedModel,
    repo: ModelRepository,
    name: str,
    target: str | None = None,
    options: ServingOptions | None = None,
    dataset: Path | str | None = None,
    parity: ParityConfig = ParityConfig(),
    version: int | None = None,
) -> PublishResult:
    """Gate ``exported`` and add it as a new version of ``name`` and of its raw-feature model; a failed gate (or an
    export whose raw columns or ONNX signature differ from the model's newest version) writes nothing.

    ``target``/``options`` None = the model's stored settings (a new model: cpu, ``ServingOptions()``). While a
    deployment serves the model its version policy is kept, so adding a version never changes what is served.
    The version's ``export.json`` records its lineage with the name, version and repository it is served as.
    """
    report = check_parity(exported, dataset, parity)
    with deploy_lock(repo, name):
        check_raw_names(repo, name)
        check_compatible(repo, name, exported.directory)
        version = version if version is not None else repo.next_version(name)
        lineage = replace(exported.record.lineage, model=name, version=version, repository=str(repo.root.resolve()))
        record = replace(exported.record, lineage=lineage, parity=report.to_dict())
        record.write(exported.directory)
        policy = served_policy(repo, name)
        if policy is not None:
            options = replace(options or current_options(repo, name), version_policy=policy)
        repo.add_version(
            name, exported.onnx_path, target=target, options=options, version=version, extra_files=exported.extra_files
        )
        raw = write_raw_model(repo, name, version)
    return PublishResult(name, version, repo.model_dir(name) / str(version) / ONNX_FILE, report, record, raw)


def export_to_repository(
    checkpoint: Checkpoint | Path | str,
    repo: ModelRepository | Path | str,
    name: str,
    target: str | None = None,
    config: ExportConfig | None = None,
    options: ServingOptions | None = None,
    dataset: Path | str | None = None,
    parity: ParityConfig = ParityConfig(),
    lineage: ModelLineage | None = None,
    version: int | None = None,
) -> PublishResult:
    """Export ``checkpoint`` into a staging directory inside ``repo``, gate it, and add it as a version of ``name``
    (the next one unless ``version`` is given). The name is checked before any work; a killed export leaves only
    a staging directory that the next export removes."""
    repo = repo if isinstance(repo, ModelRepository) else ModelRepository(repo)
    check_raw_names(repo, name)
    staging = repo.model_dir(name).parent / f".export-{validate_model_name(name)}"
    remove_stale(staging.parent)
    with staging_dir(staging) as tmp:
        exported = export_onnx(checkpoint, tmp, config or ExportConfig(), lineage)
        return publish(exported, repo, name, target, options, dataset, parity, version)
