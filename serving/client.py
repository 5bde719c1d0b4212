"""Score through Triton over HTTP or gRPC with one API; every failure is a ServingError.

``Predictor.predict_frame`` runs the shared preprocessing (``recops.training.preprocess.Preprocessor.transform``
or any callable returning an object with ``.dense``, ``.sparse``, ``.multi``) and maps the features to the
model's inputs by name: ``dense``, ``sparse``, and for each multi-hot feature ``multi_<name>`` (ids, -1
padded) with ``mask_<name>`` (ids >= 0, cast to the dtype the model declares). ``Predictor.predict_rows`` sends
raw rows to a raw-feature model (``recops.serving.raw_model``), which preprocesses them in the server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from recops.serving.errors import ServingError, require_finite
from recops.serving.onnx_model import TensorSpec
from recops.serving.raw_features import KEY_PARAMETER, MODEL_VERSION, VERSION_PARAMETER, raw_inputs, raw_model_of
from recops.serving.repository import ModelRepository
from recops.serving.server import http_address

PROTOCOLS = ("http", "grpc")


@dataclass(frozen=True)
class Prediction:
    """All outputs of one ``predict`` call, with what the server reported for each request sent."""

    outputs: dict[str, np.ndarray]
    model_versions: tuple[str, ...]  # one per request (batch chunk), as the server answered
    request_ids: tuple[str, ...]
    chunk_rows: tuple[int, ...] = ()  # rows of each request

    @property
    def row_versions(self) -> np.ndarray:
        """int64 [N]: the version that answered each row (a raw-feature model's ``model_version`` output, else the
        version each request was answered by)."""
        if MODEL_VERSION in self.outputs:
            return self.outputs[MODEL_VERSION].reshape(-1).astype(np.int64)
        return np.repeat(np.array(self.model_versions, dtype=np.int64), self.chunk_rows)

    @property
    def scores(self) -> np.ndarray:
        """The one output that is not ``model_version`` (e.g. ``probability``)."""
        scores = [v for k, v in self.outputs.items() if k != MODEL_VERSION]
        if len(scores) != 1:
            raise ServingError(f"outputs {sorted(self.outputs)} hold {len(scores)} scores; pick one by name")
        return scores[0]


def features_to_inputs(features: Any) -> dict[str, np.ndarray]:
    """Model inputs named by the export contract from a ``Features``-like object."""
    inputs = {"dense": features.dense, "sparse": features.sparse}
    for name, ids in (features.multi or {}).items():
        inputs[f"multi_{name}"] = ids
        inputs[f"mask_{name}"] = ids >= 0
    return inputs


class Predictor:
    """A client for one model on one Triton server.

    Parameters
    ----------
    url : "host:port", "http://host:port" or "grpc://host:port" (the port of ``protocol``).
    model_name : the model to score with.
    protocol : "http" or "grpc"; both behave the same.
    timeout_s : connection and per-request timeout.
    batch_size : rows per request; large inputs are split (also capped by the model's max_batch_size).
    preprocess : callable for ``predict_frame`` (raw frame -> features).
    output_name : output ``predict_arrays`` returns; default the model's only output.
    """

    def __init__(
        self,
        url: str,
        model_name: str,
        protocol: str = "http",
        timeout_s: float = 10.0,
        batch_size: int = 1024,
        preprocess: Callable[[Any], Any] | None = None,
        output_name: str | None = None,
    ):
        if protocol not in PROTOCOLS:
            raise ServingError(f"protocol {protocol!r} is unknown: use one of {', '.join(PROTOCOLS)}")
        if batch_size < 1:
            raise ServingError(f"batch_size={batch_size} must be at least 1")
        self.url, self.model_name, self.protocol = url, model_name, protocol
        self.timeout_s, self.batch_size = timeout_s, batch_size
        self.preprocess, self.output_name = preprocess, output_name
        self._client = None
        self._module = None
        self._config: dict | None = None

    # ---- plumbing ---------------------------------------------------------------------------
    def _connect(self):
        if self._client is None:
            if self.protocol == "http":
                import tritonclient.http as module

                self._client = module.InferenceServerClient(
                    http_address(self.url), connection_timeout=self.timeout_s, network_timeout=self.timeout_s
                )
            else:
                import tritonclient.grpc as module

                self._client = module.InferenceServerClient(http_address(self.url))
            self._module = module
        return self._client

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(client)``; any failure (server error, refused, timeout) becomes a ServingError."""
        try:
            return fn(self._connect())
        except ServingError:
            raise
        except Exception as exc:
            message = str(exc) or type(exc).__name__
            raise ServingError(
                f"{what} for model {self.model_name!r} at {self.url} ({self.protocol}) failed: {message}"
            ) from exc

    def _grpc_kwargs(self) -> dict:
        return {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}

    # ---- model information -------------------------------------------------------------------
    def metadata(self, model_version: str | int = "") -> dict:
        """Model metadata (name, versions, inputs and outputs with datatype and shape)."""
        extra = {"as_json": True, **self._grpc_kwargs()} if self.protocol == "grpc" else {}
        return self._call("metadata", lambda c: c.get_model_metadata(self.model_name, str(model_version), **extra))

    def config(self) -> dict:
        """The model configuration the server loaded (config.pbtxt as JSON), cached."""
        if self._config is None:
            if self.protocol == "grpc":
                answer = self._call(
                    "config", lambda c: c.get_model_config(self.model_name, as_json=True, **self._grpc_kwargs())
                )
                self._config = answer["config"]
            else:
                self._config = self._call("config", lambda c: c.get_model_config(self.model_name))
        return self._config

    def is_ready(self, model_version: str | int = "") -> bool:
        return self._call("readiness", lambda c: c.is_model_ready(self.model_name, str(model_version)))

    def inputs(self) -> tuple[TensorSpec, ...]:
        """The model's inputs as it declares them (name, datatype, shape with -1 for the batch)."""
        return tuple(
            TensorSpec(t["name"], t["datatype"], tuple(int(d) for d in t["shape"])) for t in self.metadata()["inputs"]
        )

    # ---- inference ---------------------------------------------------------------------------
    def predict(
        self,
        inputs: dict[str, np.ndarray],
        model_version: str | int = "",
        request_id: str = "",
        parameters: dict[str, Any] | None = None,
    ) -> Prediction:
        """Score ``inputs`` (name -> array, rows on the first axis), in chunks of at most the batch size;
        ``parameters`` go with every request (e.g. a raw-feature model's ``key``)."""
        arrays = {name: np.ascontiguousarray(value) for name, value in inputs.items()}
        if not arrays:
            raise ServingError(f"no inputs given for model {self.model_name!r}")
        max_batch = int(self.config().get("max_batch_size", 0))
        chunks = self._chunks(arrays, min(self.batch_size, max_batch) if max_batch > 0 else 0)
        results = []
        for i, chunk in enumerate(chunks):
            rid = f"{request_id}-{i}" if request_id and len(chunks) > 1 else request_id
            results.append(self._infer(chunk, str(model_version), rid, parameters))
        outputs = {name: np.concatenate([r[0][name] for r in results]) for name in results[0][0]}
        rows = tuple(len(next(iter(chunk.values()))) for chunk in chunks)
        return Prediction(outputs, tuple(r[1] for r in results), tuple(r[2] for r in results), rows)

    def predict_rows(
        self, frame: Any, version: int | None = None, key: str | None = None, separator: str = "|"
    ) -> Prediction:
        """Score raw rows (a DataFrame with the model's raw columns) with a raw-feature model: the server
        preprocesses them. ``version`` asks for one version; else the deployment's split routes each request by
        ``key`` (default: the request id, else random). ``separator`` joins multi-hot lists."""
        parameters = {VERSION_PARAMETER: version, KEY_PARAMETER: key}
        return self.predict(
            raw_inputs(frame, self.inputs(), separator),
            parameters={k: v for k, v in parameters.items() if v is not None},
        )

    def predict_arrays(
        self, inputs: dict[str, np.ndarray], model_version: str | int = "", request_id: str = ""
    ) -> np.ndarray:
        """The scores (one output) for ``inputs``; see ``predict`` for all outputs."""
        outputs = self.predict(inputs, model_version, request_id).outputs
        if self.output_name is not None:
            if self.output_name not in outputs:
                raise ServingError(
                    f"model {self.model_name!r} has no output {self.output_name!r} (outputs: {', '.join(outputs)})"
                )
            return outputs[self.output_name]
        if len(outputs) != 1:
            raise ServingError(f"model {self.model_name!r} has outputs {', '.join(outputs)}: pass output_name")
        return next(iter(outputs.values()))

    def predict_frame(self, frame: Any, model_version: str | int = "", request_id: str = "") -> np.ndarray:
        """Preprocess a raw frame with the constructor's ``preprocess`` and score it."""
        return self.predict_arrays(self.frame_inputs(frame), model_version, request_id)

    def frame_inputs(self, frame: Any) -> dict[str, np.ndarray]:
        """The model inputs for a raw frame, prepared by the constructor's ``preprocess``."""
        if self.preprocess is None:
            raise ServingError("predict_frame needs Predictor(preprocess=...), e.g. Preprocessor(...).transform")
        return self.feature_inputs(self.preprocess(frame))

    def feature_inputs(self, features: Any) -> dict[str, np.ndarray]:
        """The inputs the model declares, from ``Features``: contract names, each in its declared dtype (a model
        without dense columns has no ``dense`` input)."""
        from tritonclient.utils import triton_to_np_dtype

        declared = {t["name"]: t["datatype"] for t in self.metadata()["inputs"]}
        return {
            name: np.ascontiguousarray(value, triton_to_np_dtype(declared[name]))
            for name, value in features_to_inputs(features).items()
            if name in declared
        }

    @staticmethod
    def _chunks(arrays: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
        rows = {name: (a.shape[0] if a.ndim else 0) for name, a in arrays.items()}
        if size == 0:
            return [arrays]
        if len(set(rows.values())) != 1 or 0 in rows.values():
            raise ServingError(f"inputs need the same, non-zero number of rows on axis 0; got {rows}")
        n = next(iter(rows.values()))
        return [{name: a[start : start + size] for name, a in arrays.items()} for start in range(0, n, size)]

    def _infer(
        self, arrays: dict[str, np.ndarray], model_version: str, request_id: str, parameters: dict[str, Any] | None
    ):
        from tritonclient.utils import np_to_triton_dtype

        def run(client):
            tensors = []
            for name, array in arrays.items():
                dtype = np_to_triton_dtype(array.dtype)
                if dtype is None:
                    raise ServingError(f"input {name!r} has dtype {array.dtype}, which Triton cannot carry")
                tensor = self._module.InferInput(name, list(array.shape), dtype)
                tensor.set_data_from_numpy(array)
                tensors.append(tensor)
            result = client.infer(
                self.model_name,
                tensors,
                model_version=model_version,
                request_id=request_id,
                parameters=parameters,
                **self._grpc_kwargs(),
            )
            response = result.get_response()
            if isinstance(response, dict):
                names, version, rid = (
                    [o["name"] for o in response["outputs"]],
                    response["model_version"],
                    response.get("id", ""),
                )
            else:
                names, version, rid = [o.name for o in response.outputs], response.model_version, response.id
            where = f"model {self.model_name!r} version {version} at {self.url}"
            return {n: require_finite(result.as_numpy(n), f"{where}, output {n!r},") for n in names}, version, rid

        return self._call("inference", run)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def raw_predictor(url: str, repo: ModelRepository, name: str, **options: Any) -> Predictor | None:
    """A client of ``name``'s raw-feature model when ``repo`` has one and the server at ``url`` has it loaded (else
    None: preprocess here and call ``name``). ``options`` as for ``Predictor``."""
    raw = raw_model_of(repo, name)
    if raw is None:
        return None
    predictor = Predictor(url, raw, **options)
    if predictor.is_ready():
        return predictor
    predictor.close()
    return None
