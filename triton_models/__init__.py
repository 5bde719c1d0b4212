"""What every Triton model repository recops writes shares: the python-backend code of the raw-feature model's
steps (``raw_preprocess.py``, ``raw_score.py``), copied into each repository by ``recops.serving.raw_model``.

These files run inside Triton's python-backend stub (they import ``triton_python_backend_utils``), not in recops.
"""
