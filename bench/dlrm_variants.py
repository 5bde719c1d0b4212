"""The DLRM training variants that ``bench/train_throughput.py`` compares, and its worker process.

``python -m recops.bench.dlrm_variants --variant NAME --config-json JSON [--nproc N]`` measures one variant at every
batch size, on N ranks (gloo on CPU, nccl on CUDA) each taking its share of every batch, and prints one JSON line
(samples/s per timed repeat, peak RSS, the path measured).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from recops.bench.common import cores, format_table, measure, peak_rss_mib, pin_threads, run_main
from recops.bench.train_throughput import SHARDED, VARIANTS, ThroughputConfig
from recops.errors import RecopsError
from recops.files import write_json_atomic
from recops.training.config import ModelConfig, TrainConfig
from recops.training.model import DLRM, DLRMHead, to_kjt
from recops.training.train import OPTIMIZER_CLASSES, build_model, free_port, train_all

Tensors = tuple  # one batch: (dense [B, 13] f32, sparse ids [B, 26] i64, label [B] f32), host tensors
Step = Callable[[], torch.Tensor]  # one training step; returns the (detached) loss
Bind = Callable[[list[Tensors], ExitStack], Step]  # the step that trains on these batches (cleanup on the stack)


def synthetic_batches(cfg: ThroughputConfig, batch_size: int, count: int, pin: bool) -> list[Tensors]:
    """``count`` random batches: log-normal dense features, ids uniform or Zipf(``zipf_a``) hashed into each table."""
    rng = np.random.default_rng([cfg.seed, batch_size])
    rows = np.array(list(cfg.tables().values()), dtype=np.int64)
    salt = rng.integers(0, 2**31, size=len(rows))
    out = []
    for _ in range(count):
        dense = np.log1p(rng.lognormal(1.0, 1.5, size=(batch_size, 13))).astype(np.float32)
        if cfg.zipf_a:
            ranks = rng.zipf(cfg.zipf_a, size=(batch_size, len(rows))).astype(np.uint64) - 1
            hashed = (ranks * np.uint64(2654435761) + salt.astype(np.uint64)) % rows.astype(np.uint64)
            ids = hashed.astype(np.int64)
        else:
            ids = rng.integers(0, rows, size=(batch_size, len(rows)))
        label = (rng.random(batch_size) < 0.25).astype(np.float32)
        batch = tuple(torch.from_numpy(a) for a in (dense, ids, label))
        out.append(tuple(t.pin_memory() for t in batch) if pin else batch)
    return out


class EmbeddingBagDLRM(nn.Module):
    """The plain-PyTorch DLRM: one ``nn.EmbeddingBag`` per table feeding the shared ``DLRMHead``."""

    def __init__(self, config: ModelConfig, sparse_grad: bool, device: torch.device | str = "cpu"):
        super().__init__()
        self.bags = nn.ModuleList(
            nn.EmbeddingBag(rows, config.embedding_dim, mode="sum", sparse=sparse_grad, device=device)
            for rows in config.tables.values()
        )
        for bag in self.bags:  # TorchRec's default initialisation, so both variants start alike
            bound = math.sqrt(1.0 / bag.num_embeddings)
            nn.init.uniform_(bag.weight, -bound, bound)
        self.head = DLRMHead(config).to(device)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        by_table = ids.t().contiguous()
        pooled = torch.stack([bag(by_table[i].view(-1, 1)) for i, bag in enumerate(self.bags)], dim=1)
        return self.head(dense, pooled)


def _fbgemm_cuda() -> bool:
    try:
        import fbgemm_gpu
    except ImportError:
        return False
    return getattr(fbgemm_gpu, "__variant__", "") == "cuda"


def _to(device, *tensors):
    nb = device.type == "cuda"
    return tuple(t.to(device, non_blocking=nb) for t in tensors)


def _stepping(step: Callable[[Tensors], torch.Tensor]) -> Bind:
    """A variant that is handed each batch: it cycles through the given ones."""

    def bind(batches: list[Tensors], stack: ExitStack) -> Step:
        cursor = itertools.cycle(batches)
        return lambda: step(next(cursor))

    return bind


def _dmp(cfg: ThroughputConfig, device: torch.device) -> tuple[Any, Any, str]:
    """The model and its dense optimizer as ``training/train.py`` builds them, and a description."""
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )
    optimizers = {"embedding_optimizer": cfg.embedding_optimizer, "embedding_lr": cfg.embedding_lr}
    train = TrainConfig(**optimizers, dense_lr=cfg.dense_lr)
    dmp, dense_opt = build_model(cfg.model_config(), train, device)
    return (
        dmp,
        dense_opt,
        f"DistributedModelParallel(world={dist.get_world_size()}, table_wise) + fused in-backward "
        f"{cfg.embedding_optimizer} (fbgemm TBE {device.type} kernels)",
    )


def _torchrec_dmp(cfg: ThroughputConfig, device: torch.device) -> tuple[Bind, str]:
    """One step after the other, the KJT built inside the step: ``training/train.py`` before its input pipeline."""
    from torchrec.datasets.utils import Batch

    dmp, dense_opt, path = _dmp(cfg, device)
    keys = list(cfg.tables())

    def step(batch: Tensors) -> torch.Tensor:
        dense, ids, label = batch
        loss, _ = dmp(Batch(dense, to_kjt(keys, ids), label).to(device, non_blocking=device.type == "cuda"))
        dense_opt.zero_grad()
        loss.backward()
        dense_opt.step()
        return loss.detach()

    return _stepping(step), f"{path}; sequential steps, KJT built in the step"


def _torchrec_pipeline(cfg: ThroughputConfig, device: torch.device) -> tuple[Bind, str]:
    """``training/train.py``'s input path: a BatchLoader thread gathers rows and builds KJTs ahead, TorchRec's
    TrainPipelineSparseDist distributes the next batches' ids while the current one computes."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from recops.training.loader import BatchLoader
    from recops.training.preprocess import Features

    dmp, dense_opt, path = _dmp(cfg, device)
    pipeline = TrainPipelineSparseDist(dmp, dense_opt, device)
    keys = list(cfg.tables())

    def bind(batches: list[Tensors], stack: ExitStack) -> Step:
        dense, ids, label = (np.concatenate([b[i].numpy() for b in batches]) for i in range(3))
        rows = len(batches[0][0])
        indices = (np.arange(i * rows, (i + 1) * rows) for i in itertools.cycle(range(len(batches))))
        loader = stack.enter_context(
            BatchLoader(Features(dense, ids, label=label), keys, indices, pin=device.type == "cuda")
        )
        stack.callback(train_all, pipeline, iter(()))  # first (LIFO): finish the batches in flight, ids in transit
        batches_in = iter(loader)
        return lambda: pipeline.progress(batches_in)[0]

    return bind, f"{path}; BatchLoader thread + TrainPipelineSparseDist"


def _unfused_step(
    cfg: ThroughputConfig, model: nn.Module, embeddings: nn.Module, inputs: Callable[[Tensors], tuple]
) -> Bind:
    """Steps with separate optimizers: ``OPTIMIZER_CLASSES`` on ``embeddings``, Adam on ``model.head``;
    ``inputs(batch)`` gives the model's arguments and the label on the device."""
    emb_opt = OPTIMIZER_CLASSES[cfg.embedding_optimizer](embeddings.parameters(), lr=cfg.embedding_lr)
    dense_opt = torch.optim.Adam(model.head.parameters(), lr=cfg.dense_lr)

    def step(batch: Tensors) -> torch.Tensor:
        *args, label = inputs(batch)
        loss = F.binary_cross_entropy_with_logits(model(*args), label)
        emb_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        emb_opt.step()
        dense_opt.step()
        return loss.detach()

    return _stepping(step)


def _torchrec_unsharded(cfg: ThroughputConfig, device: torch.device) -> tuple[Bind, str]:
    """TorchRec's EBC without DMP (plain torch embedding-bag kernels) and regular optimizers."""
    model = DLRM(cfg.model_config(), device=device)
    bind = _unfused_step(cfg, model, model.ebc, lambda b: _to(device, b[0], to_kjt(model.keys, b[1]), b[2]))
    return bind, (
        f"unsharded torchrec.EmbeddingBagCollection (plain torch {device.type} kernels, dense gradients) "
        f"+ torch.optim.{OPTIMIZER_CLASSES[cfg.embedding_optimizer].__name__}: "
        f"fbgemm-gpu {device.type} kernels not installed, no DMP"
    )


def _plain(cfg: ThroughputConfig, device: torch.device, sparse_grad: bool) -> tuple[Bind, str]:
    model = EmbeddingBagDLRM(cfg.model_config(), sparse_grad, device)
    bind = _unfused_step(cfg, model, model.bags, lambda b: _to(device, *b))
    kind = "sparse=True, sparse gradients" if sparse_grad else "dense gradients"
    return (
        bind,
        f"nn.EmbeddingBag(mode='sum', {kind}) x26 + torch.optim.{OPTIMIZER_CLASSES[cfg.embedding_optimizer].__name__}",
    )


def _device(cfg: ThroughputConfig) -> torch.device:
    """``cfg.device``; on CUDA with several ranks, the rank's own GPU."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and dist.is_initialized() and dist.get_world_size() > 1:
        return torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
    return device


def build_variant(variant: str, cfg: ThroughputConfig) -> tuple[Bind, str]:
    """How ``variant`` trains (bind it to batches to get its step function) and a description of that path."""
    device = _device(cfg)
    if variant == "torchrec":
        path = cfg.torchrec_path
        if path == "auto":
            path = "unsharded" if device.type == "cuda" and not _fbgemm_cuda() else "dmp"
        return (_torchrec_unsharded if path == "unsharded" else _torchrec_dmp)(cfg, device)
    if variant == "torchrec_pipeline":
        return _torchrec_pipeline(cfg, device)
    if variant in ("plain_sparse", "plain_dense"):
        return _plain(cfg, device, sparse_grad=variant == "plain_sparse")
    raise RecopsError(f"train_throughput: unknown variant {variant!r}; choose from {VARIANTS}")


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _reduced(value: float, op: dist.ReduceOp.RedOpType) -> float:
    """``value`` combined over the ranks (itself in one process)."""
    if _world()[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=op)
    return float(tensor)


def _share(batch: Tensors) -> Tensors:
    """This rank's equal share of a (global) batch."""
    rank, world = _world()
    local = len(batch[0]) // world
    return tuple(t[rank * local : (rank + 1) * local] for t in batch)


def _points(bind: Bind, cfg: ThroughputConfig, sync: Callable[[], None] | None) -> list[dict[str, Any]]:
    """samples/s (of the whole batch, over all ranks) per timed repeat and per CPU-second, at every batch size."""
    points = []
    for bs in cfg.batch_sizes:
        batches = [_share(b) for b in synthetic_batches(cfg, bs, count=4, pin=cfg.device.startswith("cuda"))]
        with ExitStack() as stack:
            one = bind(batches, stack)
            per_step = measure(one, warmup=cfg.warmup_steps, repeats=1, sync=sync).median_s
            steps = int(_reduced(max(1, math.ceil(cfg.min_seconds / max(per_step, 1e-6))), dist.ReduceOp.MAX))
            cpu_start = time.process_time()
            timing = measure(lambda f=one, s=steps: [f() for _ in range(s)], warmup=0, repeats=cfg.repeats, sync=sync)
            cpu_s = _reduced(time.process_time() - cpu_start, dist.ReduceOp.SUM)
        points.append(
            {
                "batch_size": bs,
                "steps": steps,
                "samples_per_s": [steps * bs / t for t in timing.times_s],
                "samples_per_cpu_s": steps * cfg.repeats * bs / max(cpu_s, 1e-9),
            }
        )
    return points


def measure_variant(variant: str, cfg: ThroughputConfig) -> dict[str, Any]:
    """Measure one variant at every batch size in this process (one rank of several when a process group exists:
    the cores are split between the ranks, peak RSS is summed over them)."""
    world = _world()[1]
    pin_threads(max(1, (cfg.threads or cores()) // world))
    cuda = cfg.device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise RecopsError("train_throughput: --device cuda but torch sees no GPU; use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    bind, path = build_variant(variant, cfg)
    init_s = time.perf_counter() - start

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
        if world > 1:
            dist.barrier()

    load_start = os.getloadavg()[0]
    points = _points(bind, cfg, sync if cuda or world > 1 else None)
    result = {
        "variant": variant,
        "nproc": world,
        "path": path,
        "init_s": init_s,
        "points": points,
        "peak_rss_mib": _reduced(peak_rss_mib(), dist.ReduceOp.SUM),
        "threads": torch.get_num_threads(),
        "load_avg_1m": [load_start, os.getloadavg()[0]],
    }
    if cuda:
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    return result


def _rank(rank: int, variant: str, cfg: ThroughputConfig, nproc: int, port: int, out: str) -> None:
    backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=nproc)
    try:
        result = measure_variant(variant, cfg)
        if rank == 0:
            write_json_atomic(Path(out) / "result.json", result)
    finally:
        dist.destroy_process_group()


def run_variant(variant: str, cfg: ThroughputConfig, nproc: int = 1) -> dict[str, Any]:
    """Measure one variant, on ``nproc`` ranks (processes started here) for the TorchRec variants."""
    if nproc == 1:
        return measure_variant(variant, cfg)
    if variant not in SHARDED:
        raise RecopsError(f"train_throughput: {variant} runs in one process; only {SHARDED} run on several ranks")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(variant, cfg, nproc, free_port(), out), nprocs=nproc, start_method="spawn")
        return json.loads((Path(out) / "result.json").read_text())


def profile(variants: list[str], cfg: ThroughputConfig, batch_size: int, rounds: int = 6, steps: int = 4) -> str:
    """torch.profiler's busiest operators (self CPU ms per step: wall time inside the op on the calling thread) of
    ``variants`` side by side, in one process: ``rounds`` times ``steps`` steps of each in turn, so a busy host slows
    them alike; and their step times and the cores they kept busy."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    pin_threads(cfg.threads)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg.device.startswith("cuda") else [])
    busy: dict[str, dict[str, float]] = {v: {} for v in variants}
    seconds, cpu_seconds = dict.fromkeys(variants, 0.0), dict.fromkeys(variants, 0.0)
    with ExitStack() as stack:
        built = {v: build_variant(v, cfg) for v in variants}
        batches = synthetic_batches(cfg, batch_size, count=4, pin=False)
        runs = {v: bind(batches, stack) for v, (bind, _) in built.items()}
        for v, _ in itertools.product(variants, range(cfg.warmup_steps)):
            runs[v]()
        for _, v in itertools.product(range(rounds), variants):
            start, cpu_start = time.perf_counter(), time.process_time()
            with torch_profile(activities=activities) as prof:
                for _ in range(steps):
                    runs[v]()
            seconds[v] += time.perf_counter() - start
            cpu_seconds[v] += time.process_time() - cpu_start
            for event in prof.key_averages():
                busy[v][event.key] = busy[v].get(event.key, 0.0) + event.self_cpu_time_total / 1e3 / (rounds * steps)
    ops = sorted({op for v in variants for op in busy[v]}, key=lambda op: -max(busy[v].get(op, 0) for v in variants))
    rows = [{"op (self CPU ms/step)": op, **{v: busy[v].get(op, 0.0) for v in variants}} for op in ops[:20]]
    per_step = {v: seconds[v] * 1e3 / (rounds * steps) for v in variants}
    rows.append({"op (self CPU ms/step)": "step (wall ms)", **per_step})
    rows.append(
        {"op (self CPU ms/step)": "cores used (CPU s / wall s)", **{v: cpu_seconds[v] / seconds[v] for v in variants}}
    )
    paths = "\n".join(f"{v}: {path}" for v, (_, path) in built.items())
    header = f"batch {batch_size}, {torch.get_num_threads()} threads, {rounds} rounds x {steps} steps each, in turn"
    return f"{paths}\n{header}\n{format_table(rows)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="measure one DLRM training variant (worker of bench/train_throughput.py)")
    p.add_argument("--variant", choices=VARIANTS)
    p.add_argument("--config-json", required=True, help="ThroughputConfig as JSON")
    p.add_argument("--nproc", type=int, default=1, help="ranks (TorchRec variants)")
    p.add_argument("--profile", help="comma-separated variants to profile side by side instead")
    p.add_argument("--profile-batch", type=int, default=4096)
    args = p.parse_args(argv)
    cfg = ThroughputConfig.from_dict(json.loads(args.config_json))
    if args.profile:
        print(profile(_variants(args.profile), cfg, args.profile_batch))
    elif args.variant:
        print(json.dumps(run_variant(args.variant, cfg, args.nproc)), flush=True)
    else:
        p.error("pass --variant or --profile")
    return 0


def _variants(text: str) -> list[str]:
    names = [v for v in text.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown or not names:
        raise RecopsError(f"train_throughput: unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    return names


if __name__ == "__main__":
    run_main(main, "dlrm_variants")
