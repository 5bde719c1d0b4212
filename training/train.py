"""Train and evaluate a TorchRec DLRM with the fused in-backward embedding optimizer.

The same code path runs single-process (a world of one) and sharded: every run wraps the model in
``DistributedModelParallel`` with TorchRec's planner. ``fit`` starts the processes itself (gloo on
CPU, nccl on CUDA); ``run_worker`` is the body each process runs once a process group exists (Ray
Train calls it too).
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch

from recops.errors import RecopsError
from recops.files import write_json_atomic
from recops.processes import die_with_parent
from recops.training import checkpoint
from recops.training.checkpoint import Checkpoint, CheckpointMeta
from recops.training.config import CPU_SHARDING_TYPES, ModelConfig, TrainConfig
from recops.training.dataset import Dataset
from recops.training.loader import BatchLoader
from recops.training.metrics import auc, logloss
from recops.training.model import DLRMTrain
from recops.training.preprocess import Features

OPTIMIZER_CLASSES = {"adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}

for _noisy in ("torchrec", "torch.fx._symbolic_trace"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

Reporter = Callable[[dict[str, Any], "Path | None"], None]


@dataclass
class TrainResult:
    """A finished run: the best epoch's validation figures, the test split's (None without test rows)."""

    val_auc: float
    val_logloss: float
    test_auc: float | None
    test_logloss: float | None
    samples_per_s: float
    epochs: int
    checkpoint: str
    dataset: dict[str, str]
    history: list[dict[str, Any]]

    @property
    def auc(self) -> float | None:
        """The test AUC (``test_auc``)."""
        return self.test_auc

    @property
    def logloss(self) -> float | None:
        return self.test_logloss

    def to_dict(self) -> dict[str, Any]:
        """``auc``/``logloss`` are the test figures (kept for scripts that read them)."""
        return {**dataclasses.asdict(self), "auc": self.test_auc, "logloss": self.test_logloss}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def pick_device(choice: str = "auto") -> torch.device:
    """cuda:<LOCAL_RANK> when available (or asked), else cpu."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RecopsError("device 'cuda' requested but torch sees no GPU; use --device cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def _world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def build_model(config: ModelConfig, cfg: TrainConfig, device: torch.device) -> tuple[Any, Any]:
    """A :class:`DLRMTrain` in ``DistributedModelParallel``, sharded over the process group by TorchRec's planner
    (``cfg.sharding_type``), its embeddings updated by the fused in-backward ``cfg.embedding_optimizer``; returns it
    and the Adam optimizer (a ``KeyedOptimizer``) of its dense parameters."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    model = DLRMTrain(config, device="cpu")
    apply_optimizer_in_backward(
        OPTIMIZER_CLASSES[cfg.embedding_optimizer], model.ebc.parameters(), {"lr": cfg.embedding_lr}
    )
    sharders = [EmbeddingBagCollectionSharder()]
    constraints = {f"t_{k}": ParameterConstraints(sharding_types=[cfg.sharding_type]) for k in config.tables}
    topology = Topology(world_size=dist.get_world_size(), compute_device=device.type)
    try:
        plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(
            model, sharders, dist.GroupMember.WORLD
        )
    except RuntimeError as exc:
        raise RecopsError(
            f"sharding plan: {cfg.sharding_type} is not available on {device.type} "
            f"({str(exc).splitlines()[0][:160]}); "
            f"on CPU use one of {CPU_SHARDING_TYPES}"
        ) from exc
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    return dmp, KeyedOptimizerWrapper(dense_params, lambda p: torch.optim.Adam(p, lr=cfg.dense_lr))


def train_all(pipeline: Any, batches: Iterator[Batch]) -> tuple[list[torch.Tensor], int]:
    """Run TorchRec's training ``pipeline`` over every batch (it distributes the next batches' ids while this one
    computes); each step's loss and the samples this rank trained on."""
    losses, samples = [], 0
    while True:
        try:
            loss, logits = pipeline.progress(batches)
        except StopIteration:
            return losses, samples
        losses.append(loss)
        samples += len(logits)


class _Trainer:
    """State of one worker: the sharded model, its optimizers and training pipeline, and the data."""

    def __init__(self, dataset: Dataset, config: ModelConfig, cfg: TrainConfig, device: torch.device):
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        self.cfg, self.device = cfg, device
        self.rank, self.world = _world()
        self.config = config
        torch.manual_seed(cfg.seed)
        self.model, self.dense_opt = build_model(config, cfg, device)
        self.pipeline = TrainPipelineSparseDist(self.model, self.dense_opt, device)
        self.keys = list(self.config.tables)
        self.train = dataset.split("train")
        self.val = dataset.split("val")
        self.test = dataset.split("test")

    def _loader(self, feats: Features, indices: Iterable[np.ndarray]) -> BatchLoader:
        return BatchLoader(feats, self.keys, indices, pin=self.device.type == "cuda")

    def optim_state(self) -> dict[str, Any]:
        return {"dense": self.dense_opt.state_dict(), "fused": self.model.fused_optimizer.state_dict()}

    def restore(self, ckpt: Checkpoint) -> None:
        """The checkpoint's optimizer state, then its weights, each rank reading its own shards: ``init_state``
        (which KeyedOptimizer needs before it loads a state) takes a zero-gradient step that would move weights
        loaded before it."""
        self.dense_opt.init_state()
        optim_sd, model_sd = self.optim_state(), self.model.state_dict()
        ckpt.load_sharded(model_sd, optim_sd)
        self.dense_opt.load_state_dict(optim_sd["dense"])
        self.model.fused_optimizer.load_state_dict(optim_sd["fused"])
        self.model.load_state_dict(model_sd)

    def set_lr_factor(self, factor: float) -> None:
        """Scale both learning rates (the schedule's factor for this epoch)."""
        for group in self.dense_opt.param_groups:
            group["lr"] = self.cfg.dense_lr * factor
        for group in self.model.fused_optimizer.param_groups:
            group["lr"] = self.cfg.embedding_lr * factor
        self.model.fused_optimizer.step()  # the fused kernels take the new rate on step

    def _shares(self, order: np.ndarray) -> Iterator[np.ndarray]:
        """This rank's equal share of each batch of ``order``, sorted (memory-map friendly); the last batch is smaller
        when the rows run out, and dropped when it has fewer rows than ranks."""
        for first in range(0, len(order), self.cfg.batch_size):
            batch = order[first : first + self.cfg.batch_size]
            local = len(batch) // self.world
            if local == 0:
                return
            yield np.sort(batch[self.rank * local : (self.rank + 1) * local])

    def train_epoch(self, epoch: int) -> tuple[float, int, float]:
        """One pass over the train split; returns (mean loss, samples, seconds)."""
        self.model.train()
        self.set_lr_factor(self.cfg.lr_factor(epoch))
        n = min(self.cfg.max_train_rows or len(self.train.label), len(self.train.label))
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)
        start = time.perf_counter()
        with self._loader(self.train, self._shares(order)) as batches:
            losses, samples = train_all(self.pipeline, iter(batches))
        seconds = time.perf_counter() - start
        mean = float(torch.stack(losses).mean()) if losses else float("nan")
        return mean, samples * self.world, seconds

    @torch.no_grad()
    def predict(self, feats: Features) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities for a whole split, computed across ranks; returns (labels, probs) on every rank."""
        self.pipeline.detach()  # plain forwards; the pipeline attaches again on its next step
        self.model.eval()
        n = len(feats.label)
        if n == 0:
            return np.zeros(0, np.float32), np.zeros(0)
        bs = self.cfg.eval_batch_size
        steps = max(1, -(-n // (bs * self.world)))
        starts = [(step * self.world + self.rank) * bs for step in range(steps)]
        mine = [np.arange(lo, min(lo + bs, n)) for lo in starts]
        padded = (index if len(index) else np.zeros(1, dtype=np.int64) for index in mine)  # every rank joins each step
        mine_p = []
        with self._loader(feats, padded) as batches:
            for index, batch in zip(mine, batches):
                _, (_, logits) = self.model(batch.to(self.device))
                mine_p.append(torch.sigmoid(logits).float().cpu().numpy()[: len(index)])
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, (np.concatenate(mine), np.concatenate(mine_p)))
        idx = np.concatenate([p[0] for p in parts])
        probs = np.empty(n, dtype=np.float64)
        probs[idx] = np.concatenate([p[1] for p in parts])
        return np.asarray(feats.label), probs

    def evaluate(self, feats: Features) -> dict[str, float | None]:
        """AUC and logloss of a split (None for an empty one)."""
        labels, probs = self.predict(feats)
        if not len(labels):
            return {"auc": None, "logloss": None}
        return {"auc": auc(labels, probs), "logloss": logloss(labels, probs)}


def model_for(arch: ModelConfig, dataset: Dataset) -> ModelConfig:
    """``arch`` completed with ``dataset``'s embedding tables and dense columns."""
    return arch.for_data(dataset.table_sizes, dataset.num_dense)


def _check_data(dataset: Dataset) -> None:
    rows = dataset.rows
    if not rows.get("train") or not rows.get("val"):
        raise RecopsError(
            f"dataset {dataset.path} has {rows.get('train', 0)} train and {rows.get('val', 0)} "
            "validation rows; training needs both (ingest with --val-fraction > 0 or a val split)"
        )


def _resumable(latest: Path, dataset: Dataset, config: ModelConfig, out: Path) -> Checkpoint | None:
    """The run's own last checkpoint, if it continues this very run; a run on other data or another
    architecture stops with the fix instead of silently resuming it."""
    if not Checkpoint.exists(latest):
        return None
    ckpt = Checkpoint.open(latest)
    if ckpt.meta.dataset.version != dataset.version:
        raise RecopsError(
            f"{out} holds a run on dataset {ckpt.meta.dataset.version}, not {dataset.version}: "
            "pass --no-resume to start over there, or a new --out"
        )
    if ckpt.meta.model != config:
        raise RecopsError(
            f"{out} holds a run of another architecture ({ckpt.meta.model.to_dict()}) than "
            f"requested ({config.to_dict()}): pass --no-resume to start over there, or a new --out"
        )
    return ckpt


def _seed(latest: Path, warm_start: Path, dataset: Dataset, cfg: TrainConfig) -> None:
    """Start ``latest`` from another model's weights and optimizer state (rank 0)."""
    parent = Checkpoint.open(warm_start)
    problem = parent.warm_start_problem(dataset)
    if problem:
        raise RecopsError(
            f"cannot warm-start from {warm_start}: {problem}; train from scratch or ingest the data "
            "with the parent's preprocessing"
        )
    parent.copy_to(latest, parent.meta.fresh(dataset.ref, cfg, warm_start_from=str(parent.path)))


def _upgrade(*paths: Path) -> None:
    """Rewrite a run's old-format checkpoints in the sharded format, which resuming loads."""
    for path in paths:
        if Checkpoint.exists(path) and Checkpoint.open(path).legacy:
            Checkpoint.open(path).copy_to(path)


def run_worker(
    dataset_path: str | Path,
    arch: ModelConfig,
    cfg: TrainConfig,
    out_dir: str | Path,
    report: Reporter | None = None,
    resume: bool = True,
    warm_start: Path | None = None,
) -> TrainResult:
    """Train in an initialised process group; every rank returns the same result.

    ``resume`` continues the run in ``out_dir`` (same dataset and architecture only); ``warm_start`` (a checkpoint
    directory) seeds a run that has no checkpoint of its own yet. ``arch`` is completed from the dataset.
    """
    dataset = Dataset.open(dataset_path)
    _check_data(dataset)
    out = Path(out_dir)
    device = pick_device(cfg.device)
    rank, world = _world()
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))
    torch.set_flush_denormal(True)  # tiny gradients near convergence otherwise slow every step several-fold
    config = model_for(arch, dataset)
    latest, best_dir = out / "checkpoints" / "latest", out / "checkpoints" / "best"
    if rank == 0:
        if warm_start is not None and not (resume and Checkpoint.exists(latest)):
            _seed(latest, Path(warm_start), dataset, cfg)
        if resume:
            _upgrade(latest, best_dir)
    dist.barrier()
    previous = _resumable(latest, dataset, config, out) if resume or warm_start is not None else None
    trainer = _Trainer(dataset, config, cfg, device)
    meta = CheckpointMeta(
        model=config, train=cfg, dataset=dataset.ref, preprocessor=dataset.preprocessor_dict, world_size=world
    )
    if previous is not None:
        trainer.restore(previous)
        meta = dataclasses.replace(previous.meta, train=cfg, world_size=world)
    for epoch in range(meta.epoch + 1, cfg.epochs):
        if meta.stale >= cfg.patience:
            break
        meta, improved = _epoch(trainer, meta, epoch)
        model_sd, optim_sd = trainer.model.state_dict(), trainer.optim_state()
        saved = checkpoint.save(latest, model_sd, optim_sd, meta)
        if improved:
            checkpoint.save(best_dir, model_sd, optim_sd, meta)
        if report:
            report(meta.metrics, saved.path if saved else None)
    dist.barrier()  # rank 0 has finished writing the best checkpoint
    best = Checkpoint.open(best_dir)
    trainer.restore(best)
    test = trainer.evaluate(trainer.test)
    rates = [h["samples_per_s"] for h in meta.history]
    return TrainResult(
        val_auc=best.meta.metrics["val_auc"],
        val_logloss=best.meta.metrics["val_logloss"],
        test_auc=test["auc"],
        test_logloss=test["logloss"],
        samples_per_s=float(np.median(rates)) if rates else float("nan"),
        epochs=len(meta.history),
        checkpoint=str(best_dir),
        dataset=dataset.ref.to_dict(),
        history=list(meta.history),
    )


def _epoch(trainer: _Trainer, meta: CheckpointMeta, epoch: int) -> tuple[CheckpointMeta, bool]:
    """Train one epoch and validate; the run's metadata after it, and whether validation AUC improved."""
    loss, samples, seconds = trainer.train_epoch(epoch)
    metrics = {
        "epoch": epoch + 1,
        "train_loss": loss,
        "samples_per_s": samples / max(seconds, 1e-9),
        "lr_factor": trainer.cfg.lr_factor(epoch),
        **{f"val_{k}": v for k, v in trainer.evaluate(trainer.val).items()},
    }
    metrics["auc"], metrics["logloss"] = metrics["val_auc"], metrics["val_logloss"]  # what sweeps rank by
    improved = metrics["val_auc"] > meta.best_auc
    best_auc, stale = (metrics["val_auc"], 0) if improved else (meta.best_auc, meta.stale + 1)
    return dataclasses.replace(
        meta, epoch=epoch, best_auc=best_auc, stale=stale, metrics=metrics, history=(*meta.history, metrics)
    ), improved


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world: int, port: int, parent: int, args: tuple, logs: str) -> None:
    die_with_parent(parent)  # a killed `recops train` takes its ranks with it
    log = open(Path(logs) / f"rank-{rank}.log", "ab", buffering=0)  # noqa: SIM115 - fd 2 of this process from now on
    os.dup2(log.fileno(), 2)  # the rank's warnings, errors and C++ aborts; faulthandler adds the Python stack
    faulthandler.enable()
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    backend = "nccl" if pick_device(args[2].device).type == "cuda" else "gloo"
    if backend == "gloo" and "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # ranks of one host talk over loopback, whatever the hostname
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = run_worker(*args)
        if rank == 0:
            write_json_atomic(Path(args[3]) / "result.json", result.to_dict())
    except RecopsError as exc:  # the cause; the other ranks then fail on a lost connection
        (Path(logs) / f"rank-{rank}.error").write_text(str(exc))
        raise
    finally:
        dist.destroy_process_group()


def fit(
    dataset_path: str | Path,
    arch: ModelConfig,
    cfg: TrainConfig,
    out_dir: str | Path,
    nproc: int = 1,
    resume: bool = True,
    report: Reporter | None = None,
    warm_start: Path | None = None,
) -> TrainResult:
    """Train with ``nproc`` processes on this host (1 = in this process); see :func:`run_worker`."""
    Dataset.open(dataset_path)  # fail fast on a bad path
    out = Path(out_dir)
    if nproc == 1:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            result = run_worker(str(dataset_path), arch, cfg, out, report, resume, warm_start)
        finally:
            dist.destroy_process_group()
        write_json_atomic(out / "result.json", result.to_dict())
        return result
    if cfg.batch_size % nproc:
        raise RecopsError(f"train: batch_size {cfg.batch_size} must be divisible by --nproc {nproc}")
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    args = (str(dataset_path), arch, cfg, str(out), None, resume, warm_start)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for stale in logs.glob("rank-*.error"):
        stale.unlink()
    try:
        mp.start_processes(
            _spawned, args=(nproc, free_port(), os.getpid(), args, str(logs)), nprocs=nproc, start_method="spawn"
        )
    except ProcessException as exc:
        raise RecopsError(describe_rank_failure(exc, logs)) from exc
    return TrainResult.from_dict(json.loads((out / "result.json").read_text()))


CRASH_MARKERS = ("terminate called", "Fatal Python error", "Segmentation fault")  # C++ abort, faulthandler


def describe_rank_failure(exc: Exception, logs: Path, lines: int = 4) -> str:
    """One line: which rank failed how (a rank's RecopsError first: the others then lose their connection), with the
    last lines of its log."""
    causes = sorted(logs.glob("rank-*.error"))
    if causes:
        rank, how = int(causes[0].stem.split("-")[1]), causes[0].read_text()
    else:
        rank = getattr(exc, "error_index", 0)
        how = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    log = logs / f"rank-{rank}.log"
    text = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    crash = next((i for i, line in enumerate(text) if line.startswith(CRASH_MARKERS)), None)
    tail = text[crash : crash + 2 * lines] if crash is not None else text[-lines:]  # the abort and its latest frames
    return f"train: rank {rank} of the run failed ({how}); from {log}: {' | '.join(tail) or '(empty)'}"
