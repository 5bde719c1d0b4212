"""recops.serving: ONNX export, Triton model repository, local Triton server, client, deploy."""
