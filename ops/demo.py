"""The whole recops story on synthetic data, in a few minutes on a laptop.

synthetic data -> ingest -> Ray Tune sweep (or one training run) -> registry -> ONNX export behind the
parity gate -> a local Triton server -> version 1 in production -> windows of synthetic traffic scored
through Triton, with feedback from the planted labels -> drift injected midway -> detection ->
retraining -> validation gate -> canary -> promotion -> an HTML report. The server (and Ray) are
always stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from recops.configs import config_path
from recops.errors import RecopsError
from recops.ops.canary import CanaryConfig, Rollout
from recops.ops.gate import GateConfig
from recops.ops.loop import Loop
from recops.ops.loop_config import LoopConfig
from recops.ops.policy import PolicyConfig
from recops.ops.publish import publish_model
from recops.ops.registry import LocalRegistry, ModelVersion
from recops.ops.report import write_report
from recops.ops.retrain import RetrainConfig, register_run, sweep_and_register
from recops.ops.stream import StreamConfig, read_truth, read_window, write_synthetic_stream
from recops.processes import command_line, marked
from recops.serving.client import Predictor
from recops.serving.deploy import DeployConfig, Deployer
from recops.serving.onnx_model import read_preprocessor
from recops.serving.repository import ModelRepository
from recops.serving.server import ServerConfig, TritonServer
from recops.settings import settings
from recops.training.config import ModelConfig, TrainConfig
from recops.training.dataset import Dataset, ingest
from recops.training.spec import PreprocessConfig
from recops.training.sweep_config import SweepConfig
from recops.training.synth import SynthConfig, write
from recops.training.train import fit

MODEL_NAME = "ctr"
MARKER = ".recops-demo"
RUN_TOKEN = "RECOPS_DEMO_RUN"  # a workdir holding this file is the demo's own and may be wiped
SWEEP_TIME_LIMIT_S = 300.0  # the demo's sweep ends with the trials done by then (Tune's time budget)


@dataclass(frozen=True)
class DemoConfig:
    """The demo's data sizes, drift and training choices."""

    workdir: Path = field(default_factory=lambda: settings().runs / "demo")
    datasets: Path = field(default_factory=lambda: settings().datasets)
    rows: int = 20_000  # initial training data
    table_size: int = 1000
    stream: StreamConfig = StreamConfig(
        windows=8, rows=4000, drift_at=3, synth=SynthConfig(seed=1000, covariate_drift=0.5, concept_drift=0.5)
    )
    use_sweep: bool = True  # the first model: a Ray Tune sweep (else one training run)
    retrain_sweep: bool = False  # retraining in the loop: a sweep (else a warm-started training run, faster)
    sweep_config: Path = field(default_factory=lambda: config_path("sweep_demo.yaml"))
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rows < 2000:
            raise RecopsError(f"demo: --rows {self.rows} is too few to train on; use at least 2000")
        if self.stream.windows < self.stream.drift_at + 3:
            raise RecopsError(
                f"demo: {self.stream.windows} windows leave no room after the drift at window "
                f"{self.stream.drift_at} for detection (2 windows) and a canary window; use --windows 6 or more"
            )


def prepare_workdir(workdir: Path) -> Path:
    """An empty demo directory: created, or wiped if a previous demo made it; never someone else's files."""
    workdir = Path(workdir).resolve()
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).is_file():
            raise RecopsError(
                f"demo workdir {workdir} is not empty and was not made by the demo; pass an empty or new --workdir"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by `recops demo`; deleted by the next demo run in this directory\n")
    return workdir


class Demo:
    """Runs the story step by step; ``say`` prints the human timeline."""

    def __init__(self, config: DemoConfig, say: Callable[[str], None] = partial(print, flush=True)):
        self.config, self.say = config, say
        self.workdir = prepare_workdir(config.workdir)
        self.started = time.time()
        self.timings: dict[str, float] = {}

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.time()
        result = fn()
        self.timings[name] = round(time.time() - start, 1)
        return result

    def log(self, message: str) -> None:
        self.say(f"[{time.time() - self.started:6.1f}s] {message}")

    # ---- the first model -----------------------------------------------------------------------
    def dataset(self) -> Dataset:
        summary = write(
            replace(
                self.config.stream.synth,
                rows=self.config.rows,
                seed=self.config.seed,
                covariate_drift=0.0,
                concept_drift=0.0,
            ),
            self.workdir / "synth",
        )
        dataset = ingest(
            [self.workdir / "synth" / "data.tsv"],
            self.config.datasets,
            config=PreprocessConfig(table_size=self.config.table_size),
        )
        self.log(
            f"data: {self.config.rows} synthetic rows (oracle AUC {summary['oracle_auc']:.4f}) -> dataset "
            f"{dataset.version} ({dataset.rows})"
        )
        return dataset

    def first_model(self, dataset: Dataset, registry: LocalRegistry) -> ModelVersion:
        """A Ray Tune sweep (or one training run) on ``configs/sweep_demo.yaml``, registered as ``candidate``."""
        template = yaml.safe_load(self.config.sweep_config.read_text())
        if not self.config.use_sweep:
            arch = ModelConfig.from_dict(template.get("model", {}))
            result = fit(dataset.path, arch, TrainConfig(epochs=2, batch_size=512), self.workdir / "train")
            version = register_run(registry, result, alias="candidate", reason="demo: first model")
            self.log(f"train: one run (sweep disabled), val AUC {result.val_auc:.4f} -> registry v{version.version}")
            return version
        limit = min(float(template.get("time_limit_s") or SWEEP_TIME_LIMIT_S), SWEEP_TIME_LIMIT_S)
        data = {
            **template,
            "dataset": str(dataset.path),
            "storage_path": str(self.workdir / "sweeps"),
            "time_limit_s": limit,
            "warm_start": None,
        }
        result, version = sweep_and_register(SweepConfig.from_dict(data), registry)
        if version is None:
            raise RecopsError(f"demo sweep {result.experiment_dir} was interrupted; run the demo again")
        self.log(
            f"sweep: {len(result.trials)} trials ({self.config.sweep_config.name}) in {result.wall_s:.0f}s, best "
            f"{result.best_trial} val AUC {result.best_metrics.get('val_auc', 0):.4f} -> registry "
            f"v{version.version} (alias candidate)"
        )
        return version

    # ---- the story ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        registry = LocalRegistry(self.workdir / "registry")
        dataset = self.timed("data", self.dataset)
        version = self.timed("train", lambda: self.first_model(dataset, registry))
        repo = ModelRepository(self.workdir / "triton")
        published = self.timed(
            "export", lambda: publish_model(registry, version, repo, MODEL_NAME, dataset=dataset.path)
        )
        self.log(
            f"export: registry v{version.version} -> ONNX ({published.record.exporter}), parity max |diff| "
            f"{published.parity.max_abs_diff:.2g}, val AUC torch {published.parity.auc_torch:.4f} / onnx "
            f"{published.parity.auc_onnx:.4f} -> {MODEL_NAME} version {published.version}"
        )
        server = TritonServer(ServerConfig(repo=repo.root))
        try:
            self.timed("server_start", server.start)
            self.log(f"triton: {server.http_url} (gRPC {server.grpc_url}, metrics {server.metrics_url})")
            return self._serve(server, repo, registry, published.version, version.version)
        finally:
            if server.pid is not None:
                server.stop()
            self.log("triton: stopped")

    def _serve(
        self,
        server: TritonServer,
        repo: ModelRepository,
        registry: LocalRegistry,
        repo_version: int,
        registry_version: int,
    ) -> dict[str, Any]:
        deployer = Deployer(server, repo, MODEL_NAME, DeployConfig(drain_s=0.2))
        Rollout(deployer, registry, repo).deploy(repo_version, registry_version, "demo: first deployment")
        self.log(f"deploy: {MODEL_NAME} version {repo_version} (registry v{registry_version}) is production")
        stream = self.config.stream
        self.timed("stream", lambda: write_synthetic_stream(stream, self.workdir / "stream"))
        self.log(
            f"stream: {stream.windows} windows x {stream.rows} rows; from window {stream.drift_at} covariate drift "
            f"{stream.synth.covariate_drift} on {', '.join(stream.synth.drift_features)} and concept drift "
            f"{stream.synth.concept_drift}"
        )
        with Loop(self.loop_config(server)) as loop:
            self.timed("loop", lambda: loop.run(on_event=self._print_event))
            predictions = self.sample_predictions(server, loop)
            return {
                "production_before": repo_version,
                "production_after": loop.state.production.repo_version,
                "predictions": predictions,
                "state_dir": str(loop.state_dir),
                "events": loop.events(),
            }

    def loop_config(self, server: TritonServer) -> LoopConfig:
        return LoopConfig(
            state_dir=self.workdir / "loop",
            stream_dir=self.workdir / "stream",
            repo=self.workdir / "triton",
            model_name=MODEL_NAME,
            server_url=server.http_url,
            datasets_root=self.config.datasets,
            registry=self.workdir / "registry",
            metrics_url=server.metrics_url,
            window_s=60.0,
            feedback_delay_s=5.0,
            policy=PolicyConfig(drift_windows=2, quality_windows=2, min_new_rows=10**9, cooldown_s=0.0),
            retrain=RetrainConfig(
                use_sweep=self.config.retrain_sweep, sweep_config=self.config.sweep_config, min_windows=2
            ),
            gate=GateConfig(),
            canary=CanaryConfig(share=0.5, windows=1, drain_s=0.2),
        )

    def _print_event(self, event: dict[str, Any]) -> None:
        self.log(f"{event['kind']:<18} {event['reason']}")

    def sample_predictions(self, server, loop: Loop, rows: int = 5) -> list[dict[str, Any]]:
        """A few rows of the last window scored by the production version through tritonclient (gRPC)."""
        index, version = loop.state.next_window - 1, loop.state.production.repo_version
        spec = Dataset.open(loop.state.production.dataset).spec
        frame = read_window(loop.config.stream_dir, index, spec).head(rows)
        truth = read_truth(loop.config.stream_dir, index)
        preprocessor = read_preprocessor(loop.repo.model_dir(MODEL_NAME) / str(version))
        with Predictor(server.grpc_url, MODEL_NAME, protocol="grpc", preprocess=preprocessor.transform) as predictor:
            scores = predictor.predict_frame(frame.drop(columns=[spec.label]), model_version=version).ravel()
        out = [
            {
                "row": i,
                "version": version,
                "score": round(float(s), 4),
                "planted": round(float(truth[i]), 4) if truth is not None else None,
                "clicked": int(frame[spec.label].iloc[i]),
            }
            for i, s in enumerate(scores)
        ]
        self.log(f"predictions via tritonclient gRPC, {MODEL_NAME} v{version}, window {index}:")
        for p in out:
            self.say(
                f"          row {p['row']}: score {p['score']:.4f}  planted p {p['planted']}  clicked {p['clicked']}"
            )
        return out


def run_demo(config: DemoConfig, say: Callable[[str], None] = partial(print, flush=True)) -> dict[str, Any]:
    """Run the demo and write its report; returns the JSON contract of ``recops demo --json``.

    Every process the demo starts (Triton server and stubs, Ray, training workers) inherits a token in
    its environment; ``leftover_processes`` finds any that outlive the demo.
    """
    token = uuid.uuid4().hex
    os.environ[RUN_TOKEN] = token
    try:
        demo = Demo(config, say)
        outcome = demo.run()
    finally:
        del os.environ[RUN_TOKEN]
    summary = {
        "production_before": outcome["production_before"],
        "production_after": outcome["production_after"],
        **{f"{k}_s": v for k, v in demo.timings.items()},
    }
    report = demo.timed("report", lambda: write_report(Path(outcome["state_dir"]), demo.workdir / "report", summary))
    leftovers = leftover_processes(token)
    demo.log(f"report: {report}")
    demo.log(
        f"production: version {outcome['production_before']} -> {outcome['production_after']}; "
        f"{len(leftovers)} processes of the demo left running"
    )
    events = [{k: e[k] for k in ("t", "kind", "reason", "window", "version") if k in e} for e in outcome["events"]]
    return {
        "events": events,
        "production_before": outcome["production_before"],
        "production_after": outcome["production_after"],
        "report": str(report),
        "workdir": str(demo.workdir),
        "predictions": outcome["predictions"],
        "timings_s": {**demo.timings, "total": round(time.time() - demo.started, 1)},
        "leftover_processes": leftovers,
    }


def leftover_processes(token: str) -> list[str]:
    """Live processes other than this one whose environment carries the demo's run token."""
    return [f"{pid} {command_line(pid)}" for pid in marked(token, RUN_TOKEN)]


def demo_config(
    workdir: Path | None = None,
    rows: int | None = None,
    windows: int | None = None,
    window_rows: int | None = None,
    use_sweep: bool | None = None,
    retrain_sweep: bool | None = None,
) -> DemoConfig:
    """The embedded defaults with the CLI's overrides (drift starts at 3/8 of the windows)."""
    config = DemoConfig()
    stream = config.stream
    if windows is not None:
        stream = replace(stream, windows=windows, drift_at=max(1, windows * 3 // 8))
    if window_rows is not None:
        stream = replace(stream, rows=window_rows)
    changes = {
        k: v
        for k, v in {"workdir": workdir, "rows": rows, "use_sweep": use_sweep, "retrain_sweep": retrain_sweep}.items()
        if v is not None
    }
    return replace(config, stream=stream, **changes)
