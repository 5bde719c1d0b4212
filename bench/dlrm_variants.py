"""The DLRM training variants that ``bench/train_throughput.py`` compares, and its worker process.

``python -m recops.bench.dlrm_variants --variant NAME --config-json JSON`` measures one variant at every
batch size and prints one JSON line (samples/s per timed repeat, peak RSS, the path measured).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recops.bench.common import measure, peak_rss_mib, pin_threads, run_main
from recops.bench.train_throughput import VARIANTS, ThroughputConfig
from recops.errors import RecopsError
from recops.training.config import ModelConfig
from recops.training.model import DLRM, DLRMHead, to_kjt
from recops.training.train import OPTIMIZER_CLASSES

Batch = tuple  # (dense [B, 13] f32, sparse ids [B, 26] i64, label [B] f32), host tensors
Step = Callable[[Batch], torch.Tensor]  # one training step; returns the (detached) loss


def synthetic_batches(cfg: ThroughputConfig, batch_size: int, count: int, pin: bool) -> list[Batch]:
    """``count`` random batches: log-normal dense features, Zipf(``zipf_a``) ids hashed into each table."""
    rng = np.random.default_rng([cfg.seed, batch_size])
    rows = np.array(list(cfg.tables().values()), dtype=np.int64)
    salt = rng.integers(0, 2**31, size=len(rows))
    out = []
    for _ in range(count):
        dense = np.log1p(rng.lognormal(1.0, 1.5, size=(batch_size, 13))).astype(np.float32)
        ranks = rng.zipf(cfg.zipf_a, size=(batch_size, len(rows))).astype(np.uint64) - 1
        ids = ((ranks * np.uint64(2654435761) + salt.astype(np.uint64)) % rows.astype(np.uint64)).astype(np.int64)
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


def _torchrec_dmp(cfg: ThroughputConfig, device) -> tuple[Step, str]:
    """The model and optimizers exactly as ``recops.training.train._Trainer`` sets them up."""
    import torch.distributed as dist
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )
    config = cfg.model_config()
    model = DLRM(config, device="cpu")
    apply_optimizer_in_backward(
        OPTIMIZER_CLASSES[cfg.embedding_optimizer], model.ebc.parameters(), {"lr": cfg.embedding_lr}
    )
    sharders = [EmbeddingBagCollectionSharder()]
    constraints = {f"t_{k}": ParameterConstraints(sharding_types=["table_wise"]) for k in config.tables}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=1, compute_device=device.type), constraints=constraints
    )
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    dense_opt = KeyedOptimizerWrapper(dense_params, lambda p: torch.optim.Adam(p, lr=cfg.dense_lr))
    keys = list(config.tables)

    def step(batch: Batch) -> torch.Tensor:
        dense, kjt, label = _to(device, batch[0], to_kjt(keys, batch[1]), batch[2])
        loss = F.binary_cross_entropy_with_logits(dmp(dense, kjt), label)
        dense_opt.zero_grad()
        loss.backward()
        dense_opt.step()
        return loss.detach()

    return step, (
        f"DistributedModelParallel(world=1, table_wise) + fused in-backward {cfg.embedding_optimizer} "
        f"(fbgemm TBE {device.type} kernels)"
    )


def _unfused_step(
    cfg: ThroughputConfig, model: nn.Module, embeddings: nn.Module, inputs: Callable[[Batch], tuple]
) -> Callable[[Batch], torch.Tensor]:
    """A step with separate optimizers: ``OPTIMIZER_CLASSES`` on ``embeddings``, Adam on ``model.head``;
    ``inputs(batch)`` gives the model's arguments and the label on the device."""
    emb_opt = OPTIMIZER_CLASSES[cfg.embedding_optimizer](embeddings.parameters(), lr=cfg.embedding_lr)
    dense_opt = torch.optim.Adam(model.head.parameters(), lr=cfg.dense_lr)

    def step(batch: Batch) -> torch.Tensor:
        *args, label = inputs(batch)
        loss = F.binary_cross_entropy_with_logits(model(*args), label)
        emb_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        emb_opt.step()
        dense_opt.step()
        return loss.detach()

    return step


def _torchrec_unsharded(cfg: ThroughputConfig, device) -> tuple[Step, str]:
    """TorchRec's EBC without DMP (plain torch embedding-bag kernels) and regular optimizers."""
    model = DLRM(cfg.model_config(), device=device)
    step = _unfused_step(cfg, model, model.ebc, lambda b: _to(device, b[0], to_kjt(model.keys, b[1]), b[2]))
    return step, (
        f"unsharded torchrec.EmbeddingBagCollection (plain torch {device.type} kernels, dense gradients) "
        f"+ torch.optim.{OPTIMIZER_CLASSES[cfg.embedding_optimizer].__name__}: "
        f"fbgemm-gpu {device.type} kernels not installed, no DMP"
    )


def _plain(cfg: ThroughputConfig, device, sparse_grad: bool) -> tuple[Step, str]:
    model = EmbeddingBagDLRM(cfg.model_config(), sparse_grad, device)
    step = _unfused_step(cfg, model, model.bags, lambda b: _to(device, *b))
    kind = "sparse=True, sparse gradients" if sparse_grad else "dense gradients"
    return (
        step,
        f"nn.EmbeddingBag(mode='sum', {kind}) x26 + torch.optim.{OPTIMIZER_CLASSES[cfg.embedding_optimizer].__name__}",
    )


def build_step(variant: str, cfg: ThroughputConfig) -> tuple[Step, str]:
    """A training-step function for ``variant`` and a description of the path it measures."""
    device = torch.device(cfg.device)
    if variant == "torchrec":
        path = cfg.torchrec_path
        if path == "auto":
            path = "unsharded" if device.type == "cuda" and not _fbgemm_cuda() else "dmp"
        return (_torchrec_unsharded if path == "unsharded" else _torchrec_dmp)(cfg, device)
    if variant in ("plain_sparse", "plain_dense"):
        return _plain(cfg, device, sparse_grad=variant == "plain_sparse")
    raise RecopsError(f"train_throughput: unknown variant {variant!r}; choose from {VARIANTS}")


def run_variant(variant: str, cfg: ThroughputConfig) -> dict[str, Any]:
    """Measure one variant at every batch size in this process."""
    pin_threads(cfg.threads)
    cuda = cfg.device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise RecopsError("train_throughput: --device cuda but torch sees no GPU; use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    step, path = build_step(variant, cfg)
    init_s = time.perf_counter() - start
    sync = torch.cuda.synchronize if cuda else None
    load_start, points = os.getloadavg()[0], []
    for bs in cfg.batch_sizes:
        batches = synthetic_batches(cfg, bs, count=4, pin=cuda)
        cursor = iter(range(10**12))

        def one(batches=batches, cursor=cursor) -> None:
            step(batches[next(cursor) % len(batches)])

        per_step = measure(one, warmup=cfg.warmup_steps, repeats=1, sync=sync).median_s
        steps = max(1, math.ceil(cfg.min_seconds / max(per_step, 1e-6)))
        cpu_start = time.process_time()
        timing = measure(lambda steps=steps: [one() for _ in range(steps)], warmup=0, repeats=cfg.repeats, sync=sync)
        cpu_per_step = (time.process_time() - cpu_start) / (steps * cfg.repeats)
        points.append(
            {
                "batch_size": bs,
                "steps": steps,
                "samples_per_s": [steps * bs / t for t in timing.times_s],
                "samples_per_cpu_s": bs / max(cpu_per_step, 1e-9),
            }
        )
    result = {
        "variant": variant,
        "path": path,
        "init_s": init_s,
        "points": points,
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
        "load_avg_1m": [load_start, os.getloadavg()[0]],
    }
    if cuda:
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    return result


def profile(variant: str, cfg: ThroughputConfig, batch_size: int, steps: int = 10) -> str:
    """torch.profiler's top operators (by self CPU time) for ``steps`` training steps of one variant."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    pin_threads(cfg.threads)
    step, path = build_step(variant, cfg)
    batches = synthetic_batches(cfg, batch_size, count=4, pin=False)
    for i in range(cfg.warmup_steps):
        step(batches[i % 4])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg.device.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        for i in range(steps):
            step(batches[i % 4])
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return f"{variant}: {path}\nbatch {batch_size}, {steps} steps\n{table}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="measure one DLRM training variant (worker of bench/train_throughput.py)")
    p.add_argument("--variant", required=True, choices=VARIANTS)
    p.add_argument("--config-json", required=True, help="ThroughputConfig as JSON")
    p.add_argument(
        "--profile-batch", type=int, default=0, help="print profiler top operators at this batch size instead"
    )
    args = p.parse_args(argv)
    cfg = ThroughputConfig.from_dict(json.loads(args.config_json))
    if args.profile_batch:
        print(profile(args.variant, cfg, args.profile_batch))
    else:
        print(json.dumps(run_variant(args.variant, cfg)), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main, "dlrm_variants")
