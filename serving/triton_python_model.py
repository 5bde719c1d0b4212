"""Triton python-backend model that serves ``model.onnx`` from its version directory with onnxruntime.

The repository writer copies this file as ``<model>/<version>/model.py`` for the cpu target. It is
generic: input and output names come from the ONNX graph and config.pbtxt. Requests that Triton's
dynamic batcher hands over together are concatenated into one onnxruntime run; if that run fails,
each request is run alone so an error is reported on the request that caused it. A request whose floating-point
outputs are not all finite gets an error, never scores with a 200 (a NaN score is a broken model, not an answer).
The parameter ``intra_op_threads`` in config.pbtxt sets onnxruntime's thread count.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        threads = config.get("parameters", {}).get("intra_op_threads", {}).get("string_value", "1")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o["name"] for o in config["output"]]
        self.batching = config.get("max_batch_size", 0) > 0

    def execute(self, requests):
        feeds = [
            {name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.input_names} for r in requests
        ]
        if self.batching and len(requests) > 1:
            try:
                return self._run_merged(feeds)
            except Exception:  # fall through: find the failing request(s) one by one
                pass
        return [self._run_one(feed) for feed in feeds]

    def _run_merged(self, feeds):
        merged = {name: np.concatenate([f[name] for f in feeds]) for name in self.input_names}
        outputs = self.session.run(self.output_names, merged)
        bounds = np.cumsum([len(f[self.input_names[0]]) for f in feeds])[:-1]
        parts = [np.split(out, bounds) for out in outputs]
        return [self._response([p[i] for p in parts]) for i in range(len(feeds))]

    def _run_one(self, feed):
        try:
            return self._response(self.session.run(self.output_names, feed))
        except Exception as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"onnxruntime: {exc}"))

    def _response(self, outputs):
        for name, value in zip(self.output_names, outputs):
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                bad = int((~np.isfinite(value)).sum())
                message = f"model returned {bad} non-finite (NaN/inf) values of {value.size} in output {name!r}"
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in zip(self.output_names, outputs)]
        )
