"""Triton python-backend model: step 2 of a raw-feature model (``recops.serving.raw_model``).

``recops export`` copies this file as ``<name>_raw_score/1/model.py``. It runs the tensor-level model ``<name>`` at
the version step 1 chose (``model_version``) through a BLS request, one per version for the requests Triton's
dynamic batcher hands over together, and returns that model's outputs.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from recops.serving.raw_features import MODEL_VERSION
from recops.serving.raw_model import MODEL_PARAMETER


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model = config["parameters"][MODEL_PARAMETER]["string_value"]
        self.inputs = [i["name"] for i in config["input"] if i["name"] != MODEL_VERSION]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        try:
            feeds = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs} for r in requests]
            versions = [int(pb_utils.get_input_tensor_by_name(r, MODEL_VERSION).as_numpy()[0, 0]) for r in requests]
            responses = [None] * len(requests)
            for version in sorted(set(versions)):
                members = [i for i, v in enumerate(versions) if v == version]
                for i, response in zip(members, self._run(version, [feeds[i] for i in members])):
                    responses[i] = response
            return responses
        except Exception as exc:  # noqa: BLE001 - every request gets the error; the stub keeps running
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL)
            return [pb_utils.InferenceResponse(error=error) for _ in requests]

    def _run(self, version, feeds):
        """One BLS request for ``feeds`` (same version), split back into one response each."""
        merged = {n: np.concatenate([f[n] for f in feeds]) for n in self.inputs}
        result = pb_utils.InferenceRequest(
            model_name=self.model,
            model_version=version,
            inputs=[pb_utils.Tensor(n, v) for n, v in merged.items()],
            requested_output_names=self.outputs,
        ).exec()
        if result.has_error():
            error = pb_utils.TritonError(
                f"model {self.model!r} version {version}: {result.error().message()}; deploy that version "
                f"(`recops deploy --name {self.model} --version {version}`) or ask for a loaded one",
                pb_utils.TritonError.NOT_FOUND,
            )
            return [pb_utils.InferenceResponse(error=error) for _ in feeds]
        outputs = {n: pb_utils.get_output_tensor_by_name(result, n).as_numpy() for n in self.outputs}
        bounds = np.cumsum([len(f[self.inputs[0]]) for f in feeds])[:-1]
        parts = {n: np.split(v, bounds) for n, v in outputs.items()}
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, p[k]) for n, p in parts.items()])
            for k in range(len(feeds))
        ]
