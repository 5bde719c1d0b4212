"""Training batches gathered from (memory-mapped) feature arrays ahead of use, in a background thread.

``BatchLoader`` turns index arrays into TorchRec ``Batch``es (dense features, a ``KeyedJaggedTensor``, labels) while
the model trains on earlier ones: numpy's gathers from the memory map and the KJT's tensor ops release the GIL. At
most ``prefetch`` batches wait in its queue, so memory stays bounded; leaving the ``with`` block (the rows are done,
the consumer stopped early or raised) stops the thread and joins it, and an error in the thread is raised in the
consumer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from types import TracebackType

import numpy as np
import torch
from torchrec.datasets.utils import Batch

from recops.training.model import to_kjt
from recops.training.preprocess import Features

_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def make_batch(feats: Features, keys: list[str], index: np.ndarray) -> Batch:
    """The rows ``index`` of ``feats`` as a TorchRec ``Batch`` (features in ``keys`` order)."""
    return Batch(
        dense_features=torch.from_numpy(np.ascontiguousarray(feats.dense[index])),
        sparse_features=to_kjt(keys, feats.sparse[index], {k: v[index] for k, v in feats.multi.items()}),
        labels=torch.from_numpy(np.ascontiguousarray(feats.label[index])),
    )


class BatchLoader:
    """``Batch``es of the rows each index array of ``indices`` names, prepared up to ``prefetch`` ahead by a thread
    (pinned when ``pin``, for an asynchronous copy to the GPU). Iterate inside ``with``."""

    def __init__(
        self, feats: Features, keys: list[str], indices: Iterable[np.ndarray], prefetch: int = 2, pin: bool = False
    ):
        self._feats, self._keys, self._indices, self._pin = feats, keys, indices, pin
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="recops-batch-loader", daemon=True)

    def __enter__(self) -> BatchLoader:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the thread and wait for it (it notices within 0.1 s, even while blocked on a full queue)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __iter__(self) -> Iterator[Batch]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def _fill(self) -> None:
        try:
            for index in self._indices:
                batch = make_batch(self._feats, self._keys, index)
                if not self._put(batch.pin_memory() if self._pin else batch):
                    return
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(_Failed(exc))
            return
        self._put(_END)

    def _put(self, item: object) -> bool:
        """Queue ``item`` unless asked to stop first; whether it was queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False
