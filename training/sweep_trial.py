"""What runs inside a sweep's Tune trials (``recops.training.sweep`` is the driver side).

A trial that needs one worker trains in the Tune trial process itself: ``run_worker`` in a world-of-one process
group, each epoch's checkpoint reported with ``tune.report``; Tune reuses the trial processes (``reuse_actors``), so
torch/torchrec are imported once per process, not once per trial. A trial that needs several workers runs a Ray
Train ``TorchTrainer`` whose workers form one torch.distributed group (gloo on CPU, NCCL on GPU), possibly across
nodes. Each attempt logs a "start" event with the node(s) it runs on.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recops.files import write_json_atomic
from recops.training.checkpoint import Checkpoint
from recops.training.environment import capture
from recops.training.sweep_config import SweepConfig
from recops.training.sweep_records import log_event, trial_work_dir


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of a sweep needs; pickled into the Tune trainable."""

    config: SweepConfig
    experiment_dir: Path
    warm_start: Path | None = None  # checkpoint the trials start from (a registered model's)

    @property
    def in_trial(self) -> bool:
        """Whether trials train in the Tune trial process (one worker) rather than through Ray Train."""
        return self.config.resources.workers_per_trial == 1

    def trial_dir(self, trial_id: str) -> Path:
        return self.experiment_dir / "trials" / trial_id

    def work_dir(self, trial_id: str) -> Path:
        return trial_work_dir(self.experiment_dir, trial_id)

    def checkpoint_dirs(self, trial_id: str) -> list[Path]:
        """The checkpoints Ray kept for a trial: Tune's (one worker) or Ray Train's (several)."""
        kept = self.experiment_dir / "tune" / trial_id if self.in_trial else self.trial_dir(trial_id) / "train"
        return sorted(kept.glob("checkpoint_*"))


def prepare_work_dir(work: Path, restored: Any) -> int:
    """Make ``work/checkpoints/latest`` the checkpoint Ray restored (none: a fresh start, which ``run_worker``
    seeds from the warm start if there is one); returns the epoch training resumes at."""
    checkpoints = work / "checkpoints"
    if restored is None:
        shutil.rmtree(checkpoints, ignore_errors=True)
        checkpoints.mkdir(parents=True)
        return 0
    with restored.as_directory() as src:
        latest = Checkpoint.open(src).copy_to(checkpoints / "latest")
    if not Checkpoint.exists(checkpoints / "best"):
        latest.copy_to(checkpoints / "best")
    return latest.meta.epoch + 1


def _node() -> dict[str, str]:
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}


def _log_start(work: Path, restored: Any, nodes: list[dict[str, str]], **fields: Any) -> None:
    """Rank 0 of an attempt: restore the work dir, record the environment and a "start" event."""
    resumed_at = prepare_work_dir(work, restored)
    write_json_atomic(work / "environment.json", capture().to_dict())
    log_event(work, "start", resumed_at_epoch=resumed_at, world_size=len(nodes), nodes=nodes, **fields)


def _train_here(params: dict[str, Any], plan: TrialPlan, trial_id: str) -> None:
    """A one-worker trial: ``run_worker`` in this process, Tune keeping (and restoring) its checkpoints."""
    import torch.distributed as dist
    from ray import tune

    from recops.training.train import run_worker

    work = plan.work_dir(trial_id)
    model, train = plan.config.configs(params)
    if train.device == "cuda":
        os.environ["LOCAL_RANK"] = "0"  # Ray set CUDA_VISIBLE_DEVICES to this trial's GPU
    _log_start(work, tune.get_checkpoint(), [_node()])

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)  # returns once Tune holds the checkpoint
        log_event(work, "epoch", epoch=metrics["epoch"], auc=metrics["auc"], logloss=metrics["logloss"])

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:  # a trial Tune stops ends inside tune.report (SystemExit): the group is still destroyed for the next trial
        run_worker(plan.config.dataset.path, model, train, work, report=report, warm_start=plan.warm_start)
    finally:
        dist.destroy_process_group()


def _train_loop(loop_config: dict[str, Any]) -> None:
    """Body of every Ray Train worker: restore, then the sharded DMP training of ``recops train``."""
    import ray.train
    import torch.distributed as dist

    from recops.training.train import run_worker

    plan: TrialPlan = loop_config["plan"]
    work = plan.work_dir(loop_config["trial_id"])
    model, train = plan.config.configs(loop_config["params"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    if train.device == "cuda":
        import ray.train.torch

        os.environ["LOCAL_RANK"] = str(ray.train.torch.get_device().index or 0)  # what pick_device reads
    nodes: list[Any] = [None] * context.get_world_size()
    dist.all_gather_object(nodes, _node())
    if rank == 0:
        group = ray.util.get_current_placement_group()
        _log_start(work, ray.train.get_checkpoint(), nodes, placement_group=group.id.hex() if group else None)
    dist.barrier()

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if rank == 0:
            # The controller registers reports asynchronously; wait until it holds this checkpoint, so "epoch N"
            # in events.jsonl means a restart resumes after epoch N.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            log_event(work, "epoch", epoch=metrics["epoch"], auc=metrics["auc"], logloss=metrics["logloss"])

    run_worker(plan.config.dataset.path, model, train, work, report=report, resume=True, warm_start=plan.warm_start)


def _train_with_workers(params: dict[str, Any], plan: TrialPlan, trial_id: str) -> None:
    """A multi-worker trial: a TorchTrainer whose run lives in ``trials/<id>/train`` (a restarted trial resumes it)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    config, resources = plan.config, plan.config.resources
    retries = config.max_failures
    TorchTrainer(
        _train_loop,
        train_loop_config={"plan": plan, "params": params, "trial_id": trial_id},
        scaling_config=ScalingConfig(
            num_workers=resources.workers_per_trial,
            use_gpu=bool(resources.gpus_per_worker),
            resources_per_worker=resources.per_worker,
            placement_strategy=resources.placement_strategy,
        ),
        run_config=RunConfig(
            name="train",
            storage_path=str(plan.trial_dir(trial_id)),
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=config.metric, checkpoint_score_order=config.mode
            ),
            # Bounded: Ray retries a worker group that cannot be placed (a lost node) forever by default.
            failure_config=FailureConfig(
                max_failures=retries, controller_failure_limit=retries, max_preemption_failures=retries
            ),
        ),
    ).fit()


def run_trial(params: dict[str, Any], plan: TrialPlan) -> None:
    """One Tune trial: trains here (one worker) or through a TorchTrainer (several)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    log_event(plan.work_dir(trial_id), "trial")
    (_train_here if plan.in_trial else _train_with_workers)(params, plan, trial_id)
