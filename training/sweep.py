"""Ray Tune sweeps of sharded TorchRec training, on a local Ray or a Ray cluster (``address``).

Each trial runs ``recops.training.train.run_worker``, the same DMP training as ``recops train``
(``recops.training.sweep_trial``): a one-worker trial trains in the Tune trial process itself (reused
from trial to trial), a multi-worker trial runs a Ray Train ``TorchTrainer`` whose workers may span
nodes. Every epoch reports auc/logloss/samples_per_s and a checkpoint, so ASHA can stop a trial early.
Fault tolerance:

* a failed one-worker trial (its process or node lost): Tune restarts it, elsewhere if need be, from
  the last checkpoint it reported, up to ``max_failures`` times;
* a killed worker of a multi-worker trial: Train restarts the worker group from the last reported
  checkpoint; a failed multi-worker trial: Tune restarts it and its TorchTrainer resumes its own run
  snapshot in ``trials/<id>/train``;
* an interrupted sweep (SIGINT/SIGTERM): Tune saves its state; ``resume_sweep`` restores it and
  reruns only unfinished trials.

Experiment directory layout (``<storage_path>/<sweep id>/``, on a path every node sees)::

    sweep_config.json            the resolved SweepConfig (what --resume reads)
    sweep_summary.json           ranking, best trial, status, driver environment
    tune/                        Ray Tune's experiment state and per-trial results
    tune/<trial id>/checkpoint_*/  a one-worker trial's checkpoints (best and latest kept)
    trials/<trial id>/work/      run_worker's out_dir: checkpoints/{latest,best}, events.jsonl, environment.json
    trials/<trial id>/train/     a multi-worker trial's Ray Train run (checkpoint_*/, best and latest kept)
    trials/<trial id>/trial_record.json
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from recops.errors import RecopsError
from recops.files import write_json_atomic
from recops.training import ray_runtime
from recops.training.checkpoint import Checkpoint
from recops.training.dataset import Dataset
from recops.training.environment import Environment, capture
from recops.training.sweep_config import SweepConfig, model_fields
from recops.training.sweep_records import fmt_value, format_table, read_events
from recops.training.sweep_trial import TrialPlan, run_trial

TRIAL_DRIVER_CPU = 0.01  # the Tune trial only waits on its TorchTrainer; its workers hold the real CPUs
LOCAL_RAY_ENV = {  # setdefault'ed for a local Ray; users override by exporting them
    **ray_runtime.LOCAL_RAY_ENV,
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # one process less per trial; a local machine is not preempted
    "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": "120",  # a hung worker fails its group in 2 minutes, not 10
}
DRIVER_ENV = {
    "RAY_COLOR_PREFIX": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    # Keeping only the best and latest checkpoint (num_to_keep) makes Tune snapshot its state at each checkpoint of
    # a one-worker trial, and warn about it every few seconds; the snapshots are small files.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}
UNFINISHED = ("PENDING", "RUNNING", "PAUSED")


@dataclass
class TrialSummary:
    """One trial as the sweep ended: its params, per-epoch history and best checkpoint."""

    trial_id: str
    status: str  # finished | early_stopped | stopped (by the scheduler) | error | unfinished
    params: dict[str, Any]
    history: list[dict[str, Any]]
    best: dict[str, Any]  # metrics of the best epoch ({} if none)
    best_checkpoint: str | None
    attempts: list[dict[str, Any]]  # one per training start: pid, time, resumed_at_epoch, world_size, nodes
    wall_s: float
    error: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)

    def score(self, metric: str, mode: str) -> float:
        """The best epoch's metric, oriented so larger is better (-inf without one)."""
        value = self.best.get(metric)
        if value is None or not math.isfinite(value):
            return -math.inf
        return value if mode == "max" else -value


@dataclass
class SweepResult:
    """What ``run_sweep``/``resume_sweep`` return; ``trials`` is ranked best first."""

    sweep_id: str
    experiment_dir: Path
    status: str  # completed | interrupted | time_limit
    config: SweepConfig
    trials: list[TrialSummary]
    max_concurrent_trials: int
    wall_s: float
    environment: Environment

    @property
    def best(self) -> TrialSummary | None:
        ranked = [
            t for t in self.trials if t.best_checkpoint and t.score(self.config.metric, self.config.mode) > -math.inf
        ]
        return ranked[0] if ranked else None

    @property
    def num_errors(self) -> int:
        return sum(t.status == "error" for t in self.trials)

    @property
    def best_trial(self) -> str | None:
        return self.best.trial_id if self.best else None

    @property
    def best_checkpoint(self) -> Path | None:
        return Path(self.best.best_checkpoint) if self.best and self.best.best_checkpoint else None

    @property
    def best_metrics(self) -> dict[str, Any]:
        return dict(self.best.best) if self.best else {}

    @property
    def best_params(self) -> dict[str, Any]:
        """The best trial's complete model and train settings (fixed + sampled)."""
        if not self.best:
            return {}
        model, train = self.config.configs(self.best.params)
        return {
            "model": {k: v for k, v in model.to_dict().items() if k != "tables"},
            "train": train.to_dict(),
            "searched": self.best.params,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "sweep_id": self.sweep_id,
            "experiment_dir": str(self.experiment_dir),
            "status": self.status,
            "metric": self.config.metric,
            "mode": self.config.mode,
            "dataset": self.config.dataset.to_dict(),
            "num_trials": len(self.trials),
            "num_errors": self.num_errors,
            "best_trial": self.best_trial,
            "best_checkpoint": str(self.best_checkpoint) if self.best_checkpoint else None,
            "best_metrics": self.best_metrics,
            "best_params": self.best_params,
            "max_concurrent_trials": self.max_concurrent_trials,
            "wall_s": self.wall_s,
            "environment": self.environment.to_dict(),
            "config": self.config.to_dict(),
            "ranking": [
                {
                    "trial_id": t.trial_id,
                    "status": t.status,
                    "epochs": len(t.history),
                    self.config.metric: t.best.get(self.config.metric),
                    "params": t.params,
                }
                for t in self.trials
            ],
        }


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


# ----------------------------------------------------------------------------------------------- progress


def ranking_table(result: SweepResult) -> str:
    """The final ranked table: best trial first."""
    metric = result.config.metric
    rows = [["rank", "trial", "status", "epochs", metric, "logloss" if metric == "auc" else "auc", "params"]]
    other = rows[0][5]
    for i, t in enumerate(result.trials, 1):
        params = " ".join(f"{k}={fmt_value(v)}" for k, v in t.params.items())
        rows.append(
            [
                str(i),
                t.trial_id,
                t.status,
                str(len(t.history)),
                fmt_value(t.best.get(metric, "-")),
                fmt_value(t.best.get(other, "-")),
                params,
            ]
        )
    return format_table(rows)


# ----------------------------------------------------------------------------------------------- driver side


@contextlib.contextmanager
def _ray_session(address: str | None) -> Iterator[None]:
    """``ray_session`` for a sweep: Tune's driver settings, and a local Ray with one CPU beyond the machine's for the
    trial drivers (TRIAL_DRIVER_CPU each: N 1-CPU trials fit N cores)."""
    for key, value in DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    cpus = (os.cpu_count() or 1) + 1
    with ray_runtime.ray_session(address, cpus, LOCAL_RAY_ENV, object_store_bytes=100 << 20):
        yield


def _trial_resources(plan: TrialPlan) -> dict[str, float]:
    """What Tune reserves for each trial: the worker's resources when it trains in the trial, else the driver's."""
    return plan.config.resources.per_worker if plan.in_trial else {"CPU": TRIAL_DRIVER_CPU}


def _capacity(plan: TrialPlan, address: str | None) -> int:
    """How many trials the Ray cluster holds at once; RecopsError if it cannot hold one (instead of pending forever)."""
    import ray

    res = plan.config.resources
    where = f"the Ray cluster at {address}" if address else "the local Ray (this machine)"
    total = dict(ray.cluster_resources())
    per_trial = {k: v * res.workers_per_trial for k, v in res.per_worker.items()}
    if address and not plan.in_trial:
        per_trial["CPU"] += TRIAL_DRIVER_CPU
    elif not address:
        total["CPU"] = total.get("CPU", 0.0) - 1  # the local extra CPU is the trial drivers'
    if per_trial.get("GPU", 0) > total.get("GPU", 0.0):
        raise RecopsError(
            f"sweep resources: each trial asks for {res.gpus:g} GPU (workers_per_trial {res.workers_per_trial} x "
            f"gpus_per_worker {res.gpus_per_worker:g}) but {where} has {total.get('GPU', 0.0):g}; "
            "set resources.gpus_per_worker: 0 to train on CPU, or pass --address of a cluster with GPUs"
        )
    short = [k for k, v in per_trial.items() if v > total.get(k, 0.0) + 1e-9]
    if short:
        raise RecopsError(
            f"sweep resources: each trial asks for {per_trial[short[0]]:g} {short[0]} but {where} has "
            f"{total.get(short[0], 0.0):g}; lower workers_per_trial or the per-worker resources"
        )
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    hosts = [n for n in nodes if all(n.get(k, 0.0) + 1e-9 >= v for k, v in res.per_worker.items())]
    needed = res.workers_per_trial if res.placement_strategy == "STRICT_SPREAD" else 1
    if len(hosts) < needed:
        raise RecopsError(
            f"sweep resources: {len(hosts)} node(s) of {where} can hold one worker ({res.per_worker}), "
            f"{needed} needed (placement_strategy {res.placement_strategy}); lower the per-worker resources "
            "or workers_per_trial, or add nodes"
        )
    return max(1, min(math.floor(total[k] / v + 1e-9) for k, v in per_trial.items() if v))


@contextlib.contextmanager
def _sigterm_as_sigint() -> Iterator[None]:
    """SIGTERM means SIGINT while the sweep runs: Tune stops gracefully on it (saving its state), and outside
    Tune the KeyboardInterrupt still shuts Ray down instead of orphaning its processes. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _tuner(plan: TrialPlan, max_concurrent: int, restore: bool) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from recops.training.sweep_callbacks import LiveTable, ReleaseStoppedTrials

    config = plan.config
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), _trial_resources(plan))
    tune_dir = plan.experiment_dir / "tune"
    if restore:
        return tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    sched = config.scheduler
    # stop_last_trials=False: a trial reaching the last epoch ends by itself instead of being killed mid-wrap-up.
    scheduler = (
        ASHAScheduler(
            time_attr="epoch",
            max_t=config.epochs,
            grace_period=sched.grace_period,
            reduction_factor=sched.reduction_factor,
            stop_last_trials=False,
        )
        if sched.type == "asha"
        else FIFOScheduler()
    )
    return tune.Tuner(
        trainable,
        param_space={name: dist.to_tune() for name, dist in config.search.items()},
        tune_config=tune.TuneConfig(
            metric=config.metric,
            mode=config.mode,
            scheduler=scheduler,
            num_samples=config.num_samples,
            time_budget_s=config.time_limit_s or None,
            trial_dirname_creator=_trial_dirname,
            search_alg=BasicVariantGenerator(random_state=config.seed, max_concurrent=max_concurrent),
            reuse_actors=True,  # a trial process (torch, torchrec imported) runs trial after trial
        ),
        run_config=tune.RunConfig(
            name=tune_dir.name,
            storage_path=str(plan.experiment_dir),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=tune.CheckpointConfig(  # one-worker trials' checkpoints: the best and the latest
                num_to_keep=1, checkpoint_score_attribute=config.metric, checkpoint_score_order=config.mode
            ),
            callbacks=[LiveTable(config.metric), ReleaseStoppedTrials()],
        ),
    )


def _execute(plan: TrialPlan, address: str | None, restore: bool) -> SweepResult:
    config = plan.config
    start = time.time()
    with (
        _ray_session(address),
        _sigterm_as_sigint(),
    ):  # after ray.init, which installs its own (aborting) SIGTERM handler
        fits = _capacity(plan, address)
        max_concurrent = min(config.max_concurrent_trials or fits, fits)
        if config.max_concurrent_trials > fits:
            print(
                f"recops sweep: max_concurrent_trials {config.max_concurrent_trials} capped to {fits}, "
                "the trials the cluster holds at once",
                file=sys.stderr,
            )
        if not restore:  # only once the cluster can hold a trial
            plan.experiment_dir.mkdir(parents=True)
            write_json_atomic(
                plan.experiment_dir / "sweep_config.json",
                {"config": config.to_dict(), "warm_start": str(plan.warm_start) if plan.warm_start else None},
            )
        _tuner(plan, max_concurrent, restore).fit()
    return _collect(plan, max_concurrent, time.time() - start)


def _kept_checkpoints(plan: TrialPlan, trial_id: str) -> list[Checkpoint]:
    """Complete checkpoints Ray kept for a trial."""
    return [Checkpoint.open(p) for p in plan.checkpoint_dirs(trial_id) if Checkpoint.exists(p)]


def _summarize(plan: TrialPlan, trial: Any) -> TrialSummary:
    config = plan.config
    work = plan.work_dir(trial.trial_id)
    checkpoints = _kept_checkpoints(plan, trial.trial_id)
    newest = max((c.meta for c in checkpoints), key=lambda m: m.epoch, default=None)
    sign = 1 if config.mode == "max" else -1
    best = max(checkpoints, key=lambda c: sign * c.meta.metrics[config.metric], default=None)
    events = read_events(work)
    starts = [e for e in events if e["event"] == "start"]
    history = list(newest.history) if newest else []
    if trial.status == "ERROR":
        status = "error"
    elif trial.status in UNFINISHED:
        status = "unfinished"
    elif newest and newest.epoch + 1 >= config.epochs:
        status = "finished"
    else:
        status = "early_stopped" if newest and newest.stale >= newest.train.patience else "stopped"
    error = None
    if status == "error":
        error_file = Path(trial.path) / "error.txt" if getattr(trial, "path", None) else None
        error = (
            error_file.read_text().strip().splitlines()[-1] if error_file and error_file.exists() else "trial failed"
        )
    env_file = work / "environment.json"
    return TrialSummary(
        trial_id=trial.trial_id,
        status=status,
        params=dict(trial.config or {}),
        history=history,
        best=dict(best.meta.metrics) if best else {},
        best_checkpoint=str(best.path) if best else None,
        attempts=starts,
        wall_s=round(events[-1]["time"] - events[0]["time"], 3) if events else 0.0,
        error=error,
        environment=json.loads(env_file.read_text()) if env_file.exists() else {},
    )


def _collect(plan: TrialPlan, max_concurrent: int, wall_s: float) -> SweepResult:
    """Read the finished experiment from disk, write each trial_record.json and sweep_summary.json."""
    from ray.tune import ExperimentAnalysis, Tuner

    config = plan.config
    tune_dir = str(plan.experiment_dir / "tune")
    trials = (
        ExperimentAnalysis(tune_dir).trials if Tuner.can_restore(tune_dir) else []
    )  # [] if stopped before Tune began
    summaries = [_summarize(plan, t) for t in trials]
    summaries.sort(key=lambda s: s.score(config.metric, config.mode), reverse=True)
    unfinished = not trials or any(t.status in UNFINISHED for t in trials)
    limit_hit = config.time_limit_s and wall_s >= config.time_limit_s
    status = ("time_limit" if limit_hit else "interrupted") if unfinished else "completed"
    result = SweepResult(
        sweep_id=plan.experiment_dir.name,
        experiment_dir=plan.experiment_dir,
        status=status,
        config=config,
        trials=summaries,
        max_concurrent_trials=max_concurrent,
        wall_s=round(wall_s, 3),
        environment=capture(),
    )
    for s in summaries:
        record = {
            **asdict(s),
            "sweep_id": result.sweep_id,
            "dataset": config.dataset.to_dict(),
            "metric": config.metric,
            "epochs_planned": config.epochs,
            "warm_start": config.warm_start,
        }
        write_json_atomic(plan.trial_dir(s.trial_id) / "trial_record.json", record)
    write_json_atomic(plan.experiment_dir / "sweep_summary.json", result.to_dict())
    return result


def _adopt_warm_start(config: SweepConfig, warm_start: Path | None) -> tuple[SweepConfig, Path | None]:
    """With ``warm_start``, the trials take the parent model's architecture (which must fit the dataset's tables)."""
    if config.warm_start is None:
        return config, None
    if warm_start is None:
        raise RecopsError(f"sweep config: warm_start {config.warm_start} needs that model's checkpoint directory")
    parent = Checkpoint.open(warm_start)
    arch = {k: v for k, v in json.loads(json.dumps(parent.meta.model.to_dict())).items() if k in model_fields()}
    searched = sorted(set(config.search) & set(arch))
    clashing = sorted(k for k, v in config.model.items() if json.loads(json.dumps(v)) != arch.get(k))
    if searched or clashing:
        raise RecopsError(
            f"sweep config: warm_start takes model {config.warm_start}'s architecture {arch}; "
            f"remove {searched + clashing} from search:/model:"
        )
    problem = parent.warm_start_problem(Dataset.open(config.dataset.path))
    if problem:
        raise RecopsError(
            f"sweep config: warm_start model {config.warm_start}: {problem} ({config.dataset.version}); "
            "warm-start only on data ingested with the same preprocessing"
        )
    return replace(config, model=arch), parent.path


def ray_address(address: str | None = None) -> str | None:
    """The cluster a sweep attaches to: ``address``, else ``$RAY_ADDRESS`` (set in Ray jobs), else None (local)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def run_sweep(config: SweepConfig, address: str | None = None, warm_start: Path | None = None) -> SweepResult:
    """Run a new sweep in ``<storage_path>/<name>-<timestamp>/``; a local Ray unless :func:`ray_address` names a
    cluster (``auto``, ``HOST:6379`` or Ray Client's ``ray://HOST:10001``).

    ``warm_start`` is the checkpoint directory of ``config.warm_start`` (the caller resolves registry versions).
    """
    config, parent = _adopt_warm_start(config, warm_start)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    experiment_dir = config.storage_path / f"{config.name}-{stamp}"
    suffix = 1
    while experiment_dir.exists():
        suffix += 1
        experiment_dir = config.storage_path / f"{config.name}-{stamp}-{suffix}"
    return _execute(TrialPlan(config, experiment_dir, parent), ray_address(address), restore=False)


def load_experiment(experiment_dir: str | Path, local: bool = True) -> TrialPlan:
    """The plan of an existing experiment directory (RecopsError if it is not one)."""
    experiment_dir = Path(experiment_dir).expanduser().resolve()
    saved = experiment_dir / "sweep_config.json"
    if not saved.is_file():
        raise RecopsError(
            f"{experiment_dir} is not a sweep experiment directory (no sweep_config.json); "
            "pass the directory `recops sweep` printed as experiment_dir"
        )
    data = json.loads(saved.read_text())
    config = replace(SweepConfig.from_dict(data["config"], local=local), storage_path=experiment_dir.parent)
    return TrialPlan(config, experiment_dir, Path(data["warm_start"]) if data["warm_start"] else None)


def resume_sweep(experiment_dir: str | Path, address: str | None = None) -> SweepResult:
    """Continue an interrupted sweep: finished trials are kept, unfinished and errored ones resume from their
    checkpoints."""
    address = ray_address(address)
    plan = load_experiment(experiment_dir, local=address is None)
    from ray.tune import Tuner

    if not Tuner.can_restore(str(plan.experiment_dir / "tune")):
        raise RecopsError(
            f"{plan.experiment_dir}: no Tune state to resume (the sweep never started); start it again with --config"
        )
    return _execute(plan, address, restore=True)
