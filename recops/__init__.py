"""recops: train TorchRec DLRM models with Ray Tune, serve them from Triton, keep them good in production.

One import root. The folders at the repository root install as its subpackages:

- ``recops.training``  data pipeline, models, training, checkpoints, sweeps (knows nothing of serving or ops)
- ``recops.serving``   ONNX export, Triton repository, server, client, deployments (may import training)
- ``recops.ops``       registry, telemetry, online metrics, drift, policy, the closed loop (drives both)
- ``recops.bench``     benchmarks; ``recops.cli`` the ``recops`` command (above everything)
- ``recops.deploy``    Kubernetes manifests rendered from one set of values (reads settings, serving's name rule)
- ``recops.triton_models``  python-backend code every Triton repository shares (runs serving inside Triton)

``recops.errors`` (the one exception type), ``recops.settings`` (default locations) and ``recops.files``
(atomic writes) are leaves every layer may import.
"""

from importlib import metadata

try:
    __version__ = metadata.version("recops")
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
