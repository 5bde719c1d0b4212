"""Tiny trained checkpoints shared by the export and deploy tests (trained once per session, cached on disk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recops.training.config import ModelConfig, TrainConfig
from recops.training.dataset import ingest
from recops.training.spec import ColumnSpec, PreprocessConfig
from recops.training.train import fit

FAST = TrainConfig(epochs=1, batch_size=1024, threads=1)


def trained_checkpoint(dataset_path: Path, family: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The best checkpoint of a 1-epoch ``family`` model on ``dataset_path`` (trained once per session)."""
    out = tmp_path_factory.getbasetemp() / f"trained-{family}"
    best = out / "checkpoints" / "best"
    if not (best / "files.json").is_file():
        fit(dataset_path, ModelConfig(family=family), FAST, out)
    return best


def multi_hot_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3000 CSV rows: one dense, one categorical and one multi-hot feature (up to 3 tags) carrying the label."""
    root = tmp_path_factory.getbasetemp() / "multi-hot-data"
    found = sorted(root.glob("*/manifest.json"))
    if found:
        return found[0].parent
    rng = np.random.default_rng(0)
    n = 3000
    tags = rng.integers(0, 30, size=(n, 3))
    label = (np.isin(tags, [1, 2, 3]).any(1) ^ (rng.random(n) < 0.1)).astype(int)
    frame = pd.DataFrame(
        {
            "label": label,
            "x": rng.random(n),
            "user": rng.integers(0, 50, n).astype(str),
            "tags": ["|".join(map(str, t[: rng.integers(0, 4)])) for t in tags],
        }
    )
    root.mkdir(parents=True)
    frame.to_csv(root / "rows.csv", index=False)
    spec = ColumnSpec(dense=("x",), sparse=("user",), multi_hot={"tags": 3}, format="csv")
    return ingest([root / "rows.csv"], root, spec=spec, config=PreprocessConfig(table_size=200)).path


def multi_hot_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset path, best checkpoint) of a 1-epoch DLRM with a multi-hot feature."""
    data = multi_hot_dataset(tmp_path_factory)
    out = tmp_path_factory.getbasetemp() / "trained-multi-hot"
    best = out / "checkpoints" / "best"
    if not (best / "files.json").is_file():
        fit(data, ModelConfig(num_dense=1), TrainConfig(epochs=1, batch_size=256, threads=1), out)
    return data, best
