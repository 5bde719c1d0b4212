"""recops.training: data pipeline, TorchRec DLRM models, training, checkpoints and sweeps.

Knows nothing of serving or ops.
"""
