"""The prefetching batch loader: the batches it makes, its bounded queue, errors and early stops."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from recops.training.loader import BatchLoader
from recops.training.preprocess import Features

KEYS = ["a", "b", "tags"]


@pytest.fixture
def feats() -> Features:
    rng = np.random.default_rng(0)
    n = 100
    return Features(
        dense=rng.random((n, 2), dtype=np.float32),
        sparse=rng.integers(0, 50, (n, 2)),
        multi={"tags": np.where(rng.random((n, 3)) < 0.5, rng.integers(0, 9, (n, 3)), -1)},
        label=(rng.random(n) < 0.5).astype(np.float32),
    )


def counted(indices: list[np.ndarray], pulled: list[int], fail_at: int | None = None) -> Iterator[np.ndarray]:
    for i, index in enumerate(indices):
        if i == fail_at:
            raise ValueError(f"bad index batch {i}")
        pulled.append(i)
        yield index


def test_batches_hold_the_indexed_rows_in_order(feats):
    indices = [np.array([3, 1, 7]), np.array([0]), np.arange(90, 100)]
    with BatchLoader(feats, KEYS, indices) as loader:
        batches = list(loader)
    assert len(batches) == 3
    for index, batch in zip(indices, batches):
        assert torch.equal(batch.dense_features, torch.from_numpy(feats.dense[index]))
        assert torch.equal(batch.labels, torch.from_numpy(feats.label[index]))
        kjt = batch.sparse_features.to_dict()  # key-major: each feature's ids of every row, in row order
        assert kjt["a"].values().tolist() == feats.sparse[index, 0].tolist()
        assert kjt["b"].values().tolist() == feats.sparse[index, 1].tolist()
        tags = feats.multi["tags"][index]
        assert kjt["tags"].values().tolist() == tags[tags >= 0].tolist()
        assert kjt["tags"].lengths().tolist() == (tags >= 0).sum(1).tolist()


def test_the_thread_runs_at_most_prefetch_batches_ahead(feats):
    pulled: list[int] = []
    indices = [np.arange(i, i + 5) for i in range(0, 100, 5)]
    with BatchLoader(feats, KEYS, counted(indices, pulled), prefetch=2) as loader:
        batches = iter(loader)
        next(batches)
        time.sleep(0.5)  # ample time to run ahead, were the queue unbounded
        assert len(pulled) <= 1 + 2 + 1  # taken, queued, and one built waiting for room
        assert len(list(batches)) == 19


def test_an_error_in_the_thread_is_raised_in_the_consumer(feats):
    indices = [np.arange(i, i + 5) for i in range(0, 100, 5)]
    got = []
    with (
        pytest.raises(ValueError, match="bad index batch 3"),
        BatchLoader(feats, KEYS, counted(indices, [], fail_at=3)) as loader,
    ):
        got.extend(loader)
    assert len(got) == 3


@pytest.mark.parametrize("how", ["break", "raise"])
def test_leaving_early_stops_and_joins_the_thread(feats, how):
    endless = (np.arange(i % 90, i % 90 + 10) for i in iter(int, 1))
    before = threading.active_count()
    start = time.perf_counter()
    expected = pytest.raises(KeyError) if how == "raise" else contextlib.nullcontext()
    with expected, BatchLoader(feats, KEYS, endless, prefetch=1) as loader:
        for i, _ in enumerate(loader):
            if i == 2 and how == "raise":
                raise KeyError("consumer failed")
            if i == 2:
                break
    assert "recops-batch-loader" not in {t.name for t in threading.enumerate()}
    assert threading.active_count() == before
    assert time.perf_counter() - start < 5
