"""Train and evaluate a TorchRec DLRM with the fused in-backward embedding optimizer.

The same code path runs single-process (a world of one) and sharded: every run wraps the model in
``DistributedModelParallel`` with TorchRec's planner. ``fit`` starts the processes itself (gloo on
CPU, nccl on CUDA); ``run_worker`` is the body each process runs once a process group exists (Ray
Train calls it too).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from recops.training import checkpoint
from recops.training.dataset import Dataset
from recops.errors import RecopsError
from recops.training.metrics import auc, logloss
from recops.training.model import DLRM, ModelConfig, to_kjt
from recops.training.preprocess import Features

EMBEDDING_OPTIMIZERS = {"adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
# Sharding types TorchRec 1.8's planner offers for CPU (fbgemm-gpu-cpu); row_wise and table_row_wise need CUDA.
CPU_SHARDING_TYPES = ("table_wise", "column_wise", "data_parallel")
SHARDING_TYPES = (*CPU_SHARDING_TYPES, "row_wise", "table_row_wise")

for _noisy in ("torchrec", "torch.fx._symbolic_trace"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

Reporter = Callable[[dict[str, Any], "Path | None"], None]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run settings."""

    epochs: int = 3
    batch_size: int = 2048
    embedding_optimizer: str = "adagrad"
    embedding_lr: float = 0.05
    dense_lr: float = 1e-3
    patience: int = 2
    seed: int = 0
    eval_batch_size: int = 16_384
    sharding_type: str = "table_wise"
    device: str = "auto"
    threads: int = 0
    max_train_rows: int = 0

    def __post_init__(self) -> None:
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise RecopsError(f"train config: embedding_optimizer {self.embedding_optimizer!r} not in {list(EMBEDDING_OPTIMIZERS)}")
        if self.sharding_type not in SHARDING_TYPES:
            raise RecopsError(f"train config: sharding_type {self.sharding_type!r} not in {SHARDING_TYPES}")
        if self.epochs < 1 or self.batch_size < 1:
            raise RecopsError("train config: epochs and batch_size must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    auc: float
    logloss: float
    val_auc: float
    samples_per_s: float
    epochs: int
    checkpoint: str
    history: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pick_device(choice: str = "auto") -> torch.device:
    """cuda:<LOCAL_RANK> when available (or asked), else cpu."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RecopsError("device 'cuda' requested but torch sees no GPU; use --device cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def _world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


class _Trainer:
    """State of one worker: the sharded model, its optimizers, and the data."""

    def __init__(self, dataset: Dataset, arch: ModelConfig, cfg: TrainConfig, device: torch.device):
        from torchrec.distributed import DistributedModelParallel
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
        from torchrec.optim.keyed import KeyedOptimizerWrapper
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        self.cfg, self.device = cfg, device
        self.rank, self.world = _world()
        self.config = dataclasses.replace(arch, tables=dataset.manifest["table_sizes"])
        torch.manual_seed(cfg.seed)
        model = DLRM(self.config, device="cpu")
        apply_optimizer_in_backward(EMBEDDING_OPTIMIZERS[cfg.embedding_optimizer], model.ebc.parameters(), {"lr": cfg.embedding_lr})
        sharders = [EmbeddingBagCollectionSharder()]
        constraints = {f"t_{k}": ParameterConstraints(sharding_types=[cfg.sharding_type]) for k in self.config.tables}
        topology = Topology(world_size=self.world, compute_device=device.type)
        try:
            plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(model, sharders, dist.GroupMember.WORLD)
        except RuntimeError as exc:
            raise RecopsError(
                f"sharding plan: {cfg.sharding_type} is not available on {device.type} ({str(exc).splitlines()[0][:160]}); "
                f"on CPU use one of {CPU_SHARDING_TYPES}"
            ) from exc
        self.model = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
        dense_params = dict(in_backward_optimizer_filter(self.model.named_parameters()))
        self.dense_opt = KeyedOptimizerWrapper(dense_params, lambda p: torch.optim.Adam(p, lr=cfg.dense_lr))
        self.keys = list(self.config.tables)
        self.train = dataset.split("train")
        self.val = dataset.split("val")
        self.test = dataset.split("test")

    def _tensors(self, feats: Features, index: np.ndarray):
        pin = self.device.type == "cuda"
        dense = torch.from_numpy(np.ascontiguousarray(feats.dense[index]))
        label = torch.from_numpy(np.ascontiguousarray(feats.label[index]))
        kjt = to_kjt(self.keys, feats.sparse[index], {k: v[index] for k, v in feats.multi.items()})
        if pin:
            dense, label = dense.pin_memory(), label.pin_memory()
        nb = pin
        return dense.to(self.device, non_blocking=nb), kjt.to(self.device, non_blocking=nb), label.to(self.device, non_blocking=nb)

    def optim_state(self) -> dict[str, Any]:
        return {"dense": self.dense_opt.state_dict(), "fused": self.model.fused_optimizer.state_dict()}

    def restore(self, ckpt: checkpoint.Checkpoint) -> None:
        model_sd = self.model.state_dict()
        checkpoint.scatter_full(model_sd, ckpt.model)
        self.model.load_state_dict(model_sd)
        self.dense_opt.init_state()  # KeyedOptimizer loads only into initialised state
        for name, opt in (("fused", self.model.fused_optimizer), ("dense", self.dense_opt)):
            state = opt.state_dict()
            checkpoint.scatter_full(state["state"], ckpt.optim[name]["state"], f"{name}.")
            opt.load_state_dict(state)

    def train_epoch(self, epoch: int, skip_steps: int = 0) -> tuple[float, int, float]:
        """One pass over the train split; returns (mean loss, samples, seconds)."""
        self.model.train()
        n = len(self.train.label) if not self.cfg.max_train_rows else min(self.cfg.max_train_rows, len(self.train.label))
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)
        steps = n // self.cfg.batch_size
        local = self.cfg.batch_size // self.world
        losses, start = [], time.perf_counter()
        for step in range(skip_steps, steps):
            batch = order[step * self.cfg.batch_size:(step + 1) * self.cfg.batch_size]
            dense, kjt, label = self._tensors(self.train, np.sort(batch[self.rank * local:(self.rank + 1) * local]))
            loss = F.binary_cross_entropy_with_logits(self.model(dense, kjt), label)
            self.dense_opt.zero_grad()
            loss.backward()
            self.dense_opt.step()
            losses.append(loss.detach())
        seconds = time.perf_counter() - start
        mean = float(torch.stack(losses).mean()) if losses else float("nan")
        return mean, (steps - skip_steps) * local * self.world, seconds

    @torch.no_grad()
    def predict(self, feats: Features) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities for a whole split, computed across ranks; returns (labels, probs) on every rank."""
        self.model.eval()
        n = len(feats.label)
        bs = self.cfg.eval_batch_size
        steps = max(1, -(-n // (bs * self.world)))
        mine_idx, mine_p = [], []
        for step in range(steps):
            lo = (step * self.world + self.rank) * bs
            index = np.arange(lo, min(lo + bs, n))
            real = len(index)
            if real == 0:
                index = np.zeros(1, dtype=np.int64)  # every rank must join each sharded forward
            dense, kjt, _ = self._tensors(feats, index)
            probs = torch.sigmoid(self.model(dense, kjt)).float().cpu().numpy()
            mine_idx.append(index[:real])
            mine_p.append(probs[:real])
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, (np.concatenate(mine_idx), np.concatenate(mine_p)))
        idx = np.concatenate([p[0] for p in parts])
        probs = np.empty(n, dtype=np.float64)
        probs[idx] = np.concatenate([p[1] for p in parts])
        return np.asarray(feats.label), probs

    def evaluate(self, feats: Features) -> dict[str, float]:
        labels, probs = self.predict(feats)
        return {"auc": auc(labels, probs), "logloss": logloss(labels, probs)}


def run_worker(dataset_path: str | Path, arch: ModelConfig, cfg: TrainConfig, out_dir: str | Path,
               report: Reporter | None = None, resume: bool = True) -> TrainResult:
    """Train in an initialised process group; every rank returns the same result."""
    dataset = Dataset.open(dataset_path)
    out = Path(out_dir)
    device = pick_device(cfg.device)
    rank, world = _world()
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))
    trainer = _Trainer(dataset, arch, cfg, device)
    latest, best_dir = out / "checkpoints" / "latest", out / "checkpoints" / "best"
    history: list[dict[str, Any]] = []
    start_epoch, best_auc, stale = 0, -1.0, 0
    if resume and (latest / "files.json").exists():
        ckpt = checkpoint.load(latest)
        trainer.restore(ckpt)
        history = ckpt.trainer["history"]
        start_epoch, best_auc, stale = ckpt.trainer["epoch"] + 1, ckpt.trainer["best_auc"], ckpt.trainer["stale"]
    meta = {"model": trainer.config.to_dict(), "train": cfg.to_dict(), "dataset_version": dataset.version,
            "preprocessor": json.loads((dataset.path / "preprocessor.json").read_text()), "world_size": world}
    for epoch in range(start_epoch, cfg.epochs):
        if stale >= cfg.patience:
            break
        loss, samples, seconds = trainer.train_epoch(epoch)
        metrics = {"epoch": epoch + 1, "train_loss": loss, "samples_per_s": samples / max(seconds, 1e-9),
                   **{f"val_{k}": v for k, v in trainer.evaluate(trainer.val).items()}}
        metrics["auc"], metrics["logloss"] = metrics["val_auc"], metrics["val_logloss"]
        improved = metrics["val_auc"] > best_auc
        best_auc, stale = (metrics["val_auc"], 0) if improved else (best_auc, stale + 1)
        history.append(metrics)
        state = {**meta, "epoch": epoch, "best_auc": best_auc, "stale": stale, "history": history, "metrics": metrics}
        model_sd, optim_sd = trainer.model.state_dict(), trainer.optim_state()
        saved = checkpoint.save(latest, model_sd, optim_sd, state)
        if improved:
            checkpoint.save(best_dir, model_sd, optim_sd, state)
        if report:
            report(metrics, saved)
    dist.barrier()  # rank 0 has finished writing the best checkpoint
    trainer.restore(checkpoint.load(best_dir))
    test = trainer.evaluate(trainer.test)
    rates = [h["samples_per_s"] for h in history]
    return TrainResult(auc=test["auc"], logloss=test["logloss"], val_auc=best_auc,
                       samples_per_s=float(np.median(rates)) if rates else float("nan"),
                       epochs=len(history), checkpoint=str(best_dir), history=history)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world: int, port: int, args: tuple) -> None:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    backend = "nccl" if pick_device(args[2].device).type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = run_worker(*args)
        if rank == 0:
            _write_json(Path(args[3]) / "result.json", result.to_dict())
    finally:
        dist.destroy_process_group()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def fit(dataset_path: str | Path, arch: ModelConfig, cfg: TrainConfig, out_dir: str | Path,
        nproc: int = 1, resume: bool = True, report: Reporter | None = None) -> TrainResult:
    """Train with ``nproc`` processes on this host (1 = in this process); returns the test metrics."""
    Dataset.open(dataset_path)  # fail fast on a bad path
    out = Path(out_dir)
    args = (str(dataset_path), arch, cfg, str(out), None, resume)
    if nproc == 1:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            result = run_worker(str(dataset_path), arch, cfg, out, report, resume)
        finally:
            dist.destroy_process_group()
        _write_json(out / "result.json", result.to_dict())
        return result
    if cfg.batch_size % nproc:
        raise RecopsError(f"train: batch_size {cfg.batch_size} must be divisible by --nproc {nproc}")
    import torch.multiprocessing as mp

    mp.start_processes(_spawned, args=(nproc, free_port(), args), nprocs=nproc, start_method="spawn")
    return TrainResult(**json.loads((out / "result.json").read_text()))
