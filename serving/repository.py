"""Triton model repository writer: one ONNX file served by one of three targets, and the models around it.

Targets of the tensor-level model (the ONNX graph's own inputs):

- ``cpu``: python backend running the ONNX file with onnxruntime (``model.py`` from ``triton_python_model.py``);
  the only one the local server (the nvidia-pytriton wheel, no onnxruntime backend) can run.
- ``cpu-ort``: Triton's onnxruntime backend (``platform: "onnxruntime_onnx"``) on KIND_CPU instances (NGC images
  on CPU nodes).
- ``gpu``: the onnxruntime backend on KIND_GPU instances, optionally through ONNX Runtime's TensorRT execution
  provider (``GpuOptimization``).

Layout written (Triton's own)::

    <root>/<name>/config.pbtxt
    <root>/<name>/<version>/model.onnx   (+ its external-data files, + model.py for the cpu target)

A version directory is assembled in a hidden temp directory beside it and renamed into place, and
config.pbtxt is replaced atomically, so a server loading concurrently never sees half a version. Python models
with one fixed version (the raw-feature model's steps, ``recops.serving.raw_model``) and ensembles are written
by ``write_python_model`` and ``write_ensemble``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from recops.errors import RecopsError
from recops.files import remove_stale, staging_dir, write_text_atomic
from recops.serving.onnx_model import TensorSpec

TARGETS = ("cpu", "cpu-ort", "gpu")
_BACKENDS = {  # target -> (the config's backend line, instance kind)
    "cpu": ('backend: "python"', "KIND_CPU"),
    "cpu-ort": ('platform: "onnxruntime_onnx"', "KIND_CPU"),
    "gpu": ('platform: "onnxruntime_onnx"', "KIND_GPU"),
}
TENSORRT_PRECISIONS = ("FP32", "FP16")
CONFIG_FILE = "config.pbtxt"
SETTINGS_FILE = "recops-serving.json"  # target + options last written, reused when a call omits them
ONNX_FILE = "model.onnx"
PYTHON_MODEL_FILE = "model.py"
_PYTHON_MODEL_TEMPLATE = Path(__file__).with_name("triton_python_model.py")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
MAX_NAME = 200  # file names are at most 255 bytes, with room for staging prefixes

# ONNX element type -> Triton datatype (clients use it bare; config.pbtxt spells it with config_type).
_ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.UINT16: "UINT16",
    onnx.TensorProto.UINT32: "UINT32",
    onnx.TensorProto.UINT64: "UINT64",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.STRING: "BYTES",
}


@dataclass(frozen=True)
class DynamicBatching:
    """Server-side batching of concurrent requests."""

    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions Triton serves: the latest N, all, or a specific list."""

    kind: str = "latest"
    latest_n: int = 1
    versions: tuple[int, ...] = ()

    def to_pbtxt(self) -> str:
        if self.kind == "latest":
            return f"version_policy: {{ latest: {{ num_versions: {self.latest_n} }} }}"
        if self.kind == "all":
            return "version_policy: { all: {} }"
        if self.kind == "specific" and self.versions:
            return f"version_policy: {{ specific: {{ versions: [{', '.join(map(str, self.versions))}] }} }}"
        raise RecopsError(
            f"version policy {self.kind!r} with versions={self.versions}: use kind 'latest' (latest_n), "
            "'all', or 'specific' with a non-empty versions list"
        )


@dataclass(frozen=True)
class WarmupRequest:
    """A request Triton runs at load time so the first real request is not slow ('zero' or 'random' data).

    Random integer data can fall outside an embedding table; use 'zero' for id inputs.
    """

    batch_size: int = 1
    data: str = "zero"
    count: int = 1


@dataclass(frozen=True)
class GpuOptimization:
    """The gpu target's ``optimization`` block: ONNX Runtime's TensorRT execution provider (``tensorrt``: None, or
    its precision, FP32 or FP16), and CUDA graphs through it. ONNX Runtime captures CUDA graphs in its TensorRT
    provider (``trt_cuda_graph_enable``); its CUDA provider's capture needs one fixed input shape, which dynamic
    batching breaks, so CUDA graphs come only with TensorRT."""

    tensorrt: str | None = None
    cuda_graphs: bool = False
    workspace_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.tensorrt is not None and self.tensorrt not in TENSORRT_PRECISIONS:
            raise RecopsError(f"TensorRT precision {self.tensorrt!r}: use one of {', '.join(TENSORRT_PRECISIONS)}")
        if self.cuda_graphs and self.tensorrt is None:
            raise RecopsError(
                "CUDA graphs need the TensorRT execution provider (ONNX Runtime's CUDA provider captures one fixed "
                "input shape, which dynamic batching breaks): add --tensorrt fp32|fp16"
            )

    def to_pbtxt(self) -> str:
        if self.tensorrt is None:
            return ""
        parameters = {"precision_mode": self.tensorrt, "max_workspace_size_bytes": str(self.workspace_bytes)}
        if self.cuda_graphs:
            parameters["trt_cuda_graph_enable"] = "1"
        body = " ".join(f'parameters {{ key: "{k}" value: "{v}" }}' for k, v in parameters.items())
        accelerator = f'{{ name: "tensorrt" {body} }}'
        return f"optimization {{ execution_accelerators {{ gpu_execution_accelerator: [ {accelerator} ] }} }}"


RAW_DENSE_TYPES = ("FP32", "BYTES")


@dataclass(frozen=True)
class ServingOptions:
    """The tunable part of a model's config.pbtxt (everything not read from the ONNX graph). The defaults are a new
    model's: batches up to 4096 rows, one instance with one thread, a zero-id warm-up request at load.

    ``gpu`` applies to the gpu target only. ``raw_dense`` is the datatype of the dense columns of the model's
    raw-feature model (``recops.serving.raw_model``): FP32 (NaN = missing) or BYTES (decimal text, empty = missing).
    """

    max_batch_size: int = 4096
    dynamic_batching: DynamicBatching | None = field(default_factory=DynamicBatching)
    instance_count: int = 1
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    warmup: tuple[WarmupRequest, ...] = (WarmupRequest(batch_size=1, data="zero"),)
    intra_op_threads: int = 1
    gpu: GpuOptimization = field(default_factory=GpuOptimization)
    raw_dense: str = "FP32"

    def __post_init__(self) -> None:
        if self.raw_dense not in RAW_DENSE_TYPES:
            raise RecopsError(f"raw dense datatype {self.raw_dense!r}: use one of {', '.join(RAW_DENSE_TYPES)}")

    @classmethod
    def from_dict(cls, data: dict) -> ServingOptions:
        """Inverse of ``dataclasses.asdict`` (as stored in the model's settings file; older files lack the
        ``gpu`` and ``raw_dense`` keys)."""
        batching, policy = data["dynamic_batching"], data["version_policy"]
        return cls(
            max_batch_size=data["max_batch_size"],
            dynamic_batching=batching
            and DynamicBatching(tuple(batching["preferred_batch_sizes"]), batching["max_queue_delay_us"]),
            instance_count=data["instance_count"],
            version_policy=VersionPolicy(policy["kind"], policy["latest_n"], tuple(policy["versions"])),
            warmup=tuple(WarmupRequest(**w) for w in data["warmup"]),
            intra_op_threads=data["intra_op_threads"],
            gpu=GpuOptimization(**data.get("gpu", {})),
            raw_dense=data.get("raw_dense", "FP32"),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Everything config.pbtxt says about one model (``parameters``: the ``parameters`` map, name -> string)."""

    name: str
    target: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    options: ServingOptions = field(default_factory=ServingOptions)
    parameters: tuple[tuple[str, str], ...] = ()

    def to_pbtxt(self) -> str:
        opts = self.options
        backend, kind = _BACKENDS[self.target]
        lines = [
            f'name: "{self.name}"',
            backend,
            f"max_batch_size: {opts.max_batch_size}",
            _tensors_pbtxt("input", self.inputs),
            _tensors_pbtxt("output", self.outputs),
            f"instance_group [ {{ count: {opts.instance_count} kind: {kind} }} ]",
            opts.version_policy.to_pbtxt(),
        ]
        if opts.dynamic_batching is not None:
            lines.append(_dynamic_batching_pbtxt(opts.dynamic_batching))
        if opts.warmup:
            lines.append(_warmup_pbtxt(opts.warmup, self.inputs, opts.max_batch_size))
        if self.target == "gpu" and opts.gpu.to_pbtxt():
            lines.append(opts.gpu.to_pbtxt())
        lines += [f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in self.parameters]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class EnsembleStep:
    """One step of an ensemble: a model (version -1 = the latest loaded) and its tensors by ensemble tensor name
    (``inputs``: the step's input -> ensemble tensor; ``outputs``: the step's output -> ensemble tensor)."""

    model: str
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...]
    version: int = -1

    def to_pbtxt(self) -> str:
        maps = [f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in self.inputs]
        maps += [f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in self.outputs]
        return f'  {{ model_name: "{self.model}" model_version: {self.version}\n    ' + "\n    ".join(maps) + " }"


@dataclass(frozen=True)
class EnsembleConfig:
    """config.pbtxt of a Triton ensemble (``platform: "ensemble"``): inputs and outputs without the batch dim."""

    name: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    steps: tuple[EnsembleStep, ...]

    def to_pbtxt(self) -> str:
        steps = ",\n".join(s.to_pbtxt() for s in self.steps)
        lines = [
            f'name: "{self.name}"',
            'platform: "ensemble"',
            f"max_batch_size: {self.max_batch_size}",
            _tensors_pbtxt("input", self.inputs),
            _tensors_pbtxt("output", self.outputs),
            f"ensemble_scheduling {{ step [\n{steps}\n] }}",
        ]
        return "\n".join(lines) + "\n"


def _dims(dims: tuple[int, ...]) -> str:
    return "[ " + ", ".join(map(str, dims)) + " ]"


def config_type(dtype: str) -> str:
    """config.pbtxt's name of a Triton datatype (BYTES is TYPE_STRING there)."""
    return "TYPE_STRING" if dtype == "BYTES" else f"TYPE_{dtype}"


def _tensors_pbtxt(kind: str, specs: tuple[TensorSpec, ...]) -> str:
    body = ",\n".join(
        f'  {{ name: "{s.name}" data_type: {config_type(s.dtype)} dims: {_dims(s.dims)} }}' for s in specs
    )
    return f"{kind} [\n{body}\n]"


def _dynamic_batching_pbtxt(batching: DynamicBatching) -> str:
    parts = []
    if batching.preferred_batch_sizes:
        parts.append(f"preferred_batch_size: [ {', '.join(map(str, batching.preferred_batch_sizes))} ]")
    parts.append(f"max_queue_delay_microseconds: {batching.max_queue_delay_us}")
    return f"dynamic_batching {{ {' '.join(parts)} }}"


def _warmup_pbtxt(requests: tuple[WarmupRequest, ...], inputs: tuple[TensorSpec, ...], max_batch: int) -> str:
    entries = []
    for i, req in enumerate(requests):
        if req.data not in ("zero", "random"):
            raise RecopsError(f"warm-up data {req.data!r}: use 'zero' or 'random'")
        flag = "zero_data" if req.data == "zero" else "random_data"
        tensors = " ".join(
            f'inputs {{ key: "{s.name}" value: {{ data_type: {config_type(s.dtype)} '
            f"dims: {_dims(tuple(max(d, 1) for d in s.dims))} {flag}: true }} }}"
            for s in inputs
        )
        batch = req.batch_size if max_batch > 0 else 0
        entries.append(f'  {{ name: "warmup_{i}" batch_size: {batch} count: {req.count} {tensors} }}')
    return "model_warmup [\n" + ",\n".join(entries) + "\n]"


def validate_model_name(name: str) -> str:
    """Return ``name`` if Triton and the file system can both use it, else raise RecopsError."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", "..") or len(name) > MAX_NAME:
        shown = name if not isinstance(name, str) or len(name) <= 60 else f"{name[:40]}...({len(name)} characters)"
        raise RecopsError(
            f"model name {shown!r} is invalid: use at most {MAX_NAME} letters, digits, '_', '.', '-', not starting "
            "with '.' or '-' (e.g. 'dlrm_criteo')"
        )
    return name


def read_signature(onnx_path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], bool]:
    """Inputs, outputs (with full dims, -1 for symbolic) and whether every tensor has a dynamic first dim."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    inputs = tuple(_spec(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v) for v in model.graph.output)
    batchable = all(s.dims and s.dims[0] == -1 for s in inputs + outputs)
    return inputs, outputs, batchable


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    if tensor.elem_type not in _ONNX_TO_TRITON:
        raise RecopsError(
            f"ONNX tensor {value.name!r} has element type {tensor.elem_type}, "
            "which Triton cannot serve; export it as a numeric or bool tensor"
        )
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return TensorSpec(value.name, _ONNX_TO_TRITON[tensor.elem_type], dims)


_THREAD_PARAMETER = {"cpu": "intra_op_threads", "cpu-ort": "intra_op_thread_count"}  # model.py's, the ORT backend's


def model_config(name: str, onnx_path: Path, target: str, options: ServingOptions) -> ModelConfig:
    """The config of ``onnx_path`` served as ``name``; the batch dim is dropped when batching."""
    if target not in TARGETS:
        raise RecopsError(f"target {target!r} is unknown: use one of {', '.join(TARGETS)}")
    if target != "gpu" and options.gpu != GpuOptimization():
        raise RecopsError(
            f"TensorRT and CUDA graphs are gpu-target options; target {target!r} cannot use them (--tensorrt off)"
        )
    inputs, outputs, batchable = read_signature(onnx_path)
    if options.max_batch_size > 0:
        if not batchable:
            raise RecopsError(
                f"{onnx_path}: max_batch_size={options.max_batch_size} needs a dynamic first (batch) dim "
                "on every input and output; export with a dynamic batch axis or use max_batch_size=0"
            )
        inputs, outputs = without_batch(inputs), without_batch(outputs)
    threads = ((_THREAD_PARAMETER[target], str(options.intra_op_threads)),) if target in _THREAD_PARAMETER else ()
    return ModelConfig(validate_model_name(name), target, inputs, outputs, options, threads)


def without_batch(specs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
    """``specs`` without their first (batch) dim, as a batching model's config.pbtxt declares them."""
    return tuple(TensorSpec(s.name, s.dtype, s.dims[1:]) for s in specs)


def external_data_files(onnx_path: Path) -> list[str]:
    """Relative locations of the external-data files ``onnx_path`` references (e.g. 'model.onnx.data')."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    locations = set()
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next(e.value for e in tensor.external_data if e.key == "location")
            if Path(location).is_absolute() or ".." in Path(location).parts:
                raise RecopsError(
                    f"{onnx_path}: external data location {location!r} leaves the model's "
                    "directory; re-save the model with its data next to it"
                )
            locations.add(location)
    return sorted(locations)


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_tensors(sub)


class ModelRepository:
    """Writes models and versions into a Triton model repository directory."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def model_dir(self, name: str) -> Path:
        return self.root / validate_model_name(name)

    def models(self) -> list[str]:
        """Names of the models with a config.pbtxt (not hidden ones, e.g. a deployment's staging model)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / CONFIG_FILE).is_file() and p.name[0] != ".")

    def versions(self, name: str) -> list[int]:
        """The model's complete version numbers, ascending."""
        folder = self.model_dir(name)
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())

    def next_version(self, name: str) -> int:
        """The version number ``add_version`` gives the next version of ``name`` by default."""
        existing = self.versions(name)
        return existing[-1] + 1 if existing else 1

    def settings(self, name: str) -> tuple[str, ServingOptions]:
        """The target and options last written for ``name`` (new model: 'cpu' and the defaults)."""
        path = self.model_dir(name) / SETTINGS_FILE
        if not path.is_file():
            return "cpu", ServingOptions()
        try:
            data = json.loads(path.read_text())
            return data["target"], ServingOptions.from_dict(data["options"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RecopsError(f"{path} is unreadable ({exc}); pass target and options explicitly") from exc

    def add_version(
        self,
        name: str,
        onnx_path: Path | str,
        target: str | None = None,
        options: ServingOptions | None = None,
        version: int | None = None,
        extra_files: Sequence[Path | str] = (),
    ) -> int:
        """Copy ``onnx_path`` in as a new version (default: latest + 1), rewrite config.pbtxt, return it.

        ``target`` and ``options`` default to the model's current settings (see ``settings``).
        ``extra_files`` (e.g. the preprocessor's ``preprocess.json``) are copied into the version dir too.
        """
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise RecopsError(f"ONNX file {onnx_path} does not exist; export the model first")
        stored_target, stored_options = self.settings(name)
        config = model_config(name, onnx_path, target or stored_target, options or stored_options)
        existing = self.versions(name)
        version = version if version is not None else self.next_version(name)
        if version < 1 or version in existing:
            raise RecopsError(
                f"model {name!r} version {version} is invalid or exists (have {existing}); "
                "pass a new positive version or None for the next one"
            )
        self._install_version(config, onnx_path, version, [Path(p) for p in extra_files])
        self.write_config(config)
        return version

    def _install_version(self, config: ModelConfig, onnx_path: Path, version: int, extra: list[Path]) -> None:
        folder = self.model_dir(config.name)
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale(folder)  # what killed writers left
        with staging_dir(folder / str(version)) as staging:
            self._assemble(config, onnx_path, version, extra, staging)

    def _assemble(self, config: ModelConfig, onnx_path: Path, version: int, extra: list[Path], staging: Path) -> None:
        """Copy the version's files into ``staging`` and rename it into place."""
        try:
            shutil.copyfile(onnx_path, staging / ONNX_FILE)
            for location in external_data_files(onnx_path):
                (staging / location).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(onnx_path.parent / location, staging / location)
            for path in extra:
                if path.name in (ONNX_FILE, PYTHON_MODEL_FILE):
                    raise RecopsError(f"extra file {path} would replace the version's {path.name}; rename it")
                shutil.copyfile(path, staging / path.name)
            if config.target == "cpu":
                shutil.copyfile(_PYTHON_MODEL_TEMPLATE, staging / PYTHON_MODEL_FILE)
            os.chmod(staging, 0o755)
            os.rename(staging, self.model_dir(config.name) / str(version))
        except FileNotFoundError as exc:
            raise RecopsError(
                f"{onnx_path}: {exc.filename} is missing; the ONNX file's external data must lie next to it"
            ) from exc
        except OSError as exc:
            raise RecopsError(f"could not install {config.name!r} version {version}: {exc}") from exc

    def write_config(self, config: ModelConfig) -> Path:
        """Atomically (re)write the model's config.pbtxt and settings file."""
        folder = self.model_dir(config.name)
        folder.mkdir(parents=True, exist_ok=True)
        settings = {"target": config.target, "options": asdict(config.options)}
        write_text_atomic(folder / SETTINGS_FILE, json.dumps(settings, indent=1))
        write_text_atomic(folder / CONFIG_FILE, config.to_pbtxt())
        return folder / CONFIG_FILE

    def write_python_model(self, config: ModelConfig, code: Path) -> Path:
        """A python-backend model with one version, 1, running ``code`` (copied as ``1/model.py``). Files whose
        content is unchanged are left alone, so loading the model again is a no-op for Triton."""
        folder = self.model_dir(config.name)
        _write_if_changed(folder / "1" / PYTHON_MODEL_FILE, Path(code).read_text())
        return _write_if_changed(folder / CONFIG_FILE, config.to_pbtxt())

    def write_ensemble(self, config: EnsembleConfig) -> Path:
        """An ensemble's config.pbtxt and its (empty) version directory 1, unchanged files left alone."""
        folder = self.model_dir(config.name)
        (folder / "1").mkdir(parents=True, exist_ok=True)
        return _write_if_changed(folder / CONFIG_FILE, config.to_pbtxt())

    def configure(self, name: str, target: str | None = None, options: ServingOptions | None = None) -> ModelConfig:
        """Rewrite config.pbtxt from the latest version's ONNX signature with new options (e.g. a policy)."""
        existing = self.versions(name)
        if not existing:
            raise RecopsError(f"model {name!r} has no version in {self.root}; add one with add_version")
        onnx_path = self.model_dir(name) / str(existing[-1]) / ONNX_FILE
        stored_target, stored_options = self.settings(name)
        config = model_config(name, onnx_path, target or stored_target, options or stored_options)
        self.write_config(config)
        return config

    def remove_version(self, name: str, version: int) -> None:
        """Delete one version: renamed out of sight first, so a loader never sees it half deleted."""
        folder = self.model_dir(name)
        if version not in self.versions(name):
            raise RecopsError(f"model {name!r} has no version {version} (have {self.versions(name)})")
        doomed = folder / f".{version}.tmp-{os.getpid()}-removing"  # a killed removal is collected by remove_stale
        os.rename(folder / str(version), doomed)
        shutil.rmtree(doomed)


def _write_if_changed(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically unless it already holds exactly that."""
    if not path.is_file() or path.read_text() != text:
        write_text_atomic(path, text)
    return path
