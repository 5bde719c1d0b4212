"""Triton python-backend model: step 1 of a raw-feature model (``recops.serving.raw_model``).

``recops export`` copies this file as ``<name>_raw_preprocess/1/model.py``. For each request it picks the version of
``<name>`` (request parameter ``version``; else the deployment record's split on the parameter ``key`` or the request
id) and turns the raw columns into ``<name>``'s inputs with that version's ``preprocess.json``
(``recops.serving.raw_model.PreprocessStep``). A bad request gets a 400 error naming the column and the fix; no
error leaves ``execute``, so the stub process keeps running.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from recops.serving.raw_features import RawInputError
from recops.serving.raw_model import PreprocessStep, RawRequest


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.step = PreprocessStep.from_config(config, Path(args["model_repository"]).parent)
        self.inputs = [i["name"] for i in config["input"]]

    def execute(self, requests):
        try:
            results = self.step.run([self._request(r) for r in requests])
        except Exception as exc:  # noqa: BLE001 - every request gets the error; the stub keeps running
            results = [exc] * len(requests)
        return [_response(result) for result in results]

    def _request(self, request):
        tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in self.inputs}
        return RawRequest(
            {name: t.as_numpy() for name, t in tensors.items() if t is not None},
            json.loads(request.parameters() or "{}"),
            request.request_id(),
        )


def _response(result):
    if isinstance(result, Exception):
        code = pb_utils.TritonError.INVALID_ARG if isinstance(result, RawInputError) else pb_utils.TritonError.INTERNAL
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result), code))
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, v) for n, v in result.items()])
