"""The closed loop on a real Triton server, real TorchRec training and a real Ray Tune sweep.

One small model serves two model names in one repository (one per scenario, so the scenarios do not
share a deployment): a drifted stream retrained, canaried and promoted across a restart of the loop,
and a retraining that fails validation. ``recops demo --json`` runs the whole story in a subprocess.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from recops.errors import RecopsError
from recops.ops.canary import compare_arms
from recops.ops.exposition import Exporter
from recops.ops.loop import Loop
from recops.ops.loop_config import CanaryConfig, GateConfig, LoopConfig, RetrainConfig
from recops.ops.loop_state import EVENT_KINDS, Step, read_events
from recops.ops.policy import PolicyConfig
from recops.ops.registry import LocalRegistry
from recops.ops.stream import StreamConfig, write_synthetic_stream
from recops.serving.deploy import DeployConfig, Deployer, read_deploy_state
from recops.serving.repository import ModelRepository
from recops.serving.server import ServerConfig, TritonServer, triton_processes
from recops.training.synth import SynthConfig
from tests.conftest import recops
from tests.triton_fixtures import processes_mentioning

ROWS = 3000  # per window


@dataclass
class Served:
    root: Path
    repo: ModelRepository
    server: TritonServer
    datasets: Path
    registry: Path

    def deploy(self, name: str) -> None:
        """``name`` version 1 = the fixture's model, in production."""
        source = self.repo.model_dir("base") / "1"
        self.repo.add_version(
            name, source / "model.onnx", extra_files=[source / "preprocess.json", source / "export.json"]
        )
        Deployer(self.server, self.repo, name, DeployConfig(drain_s=0.1)).deploy(1)

    def config(self, name: str, stream: Path, **changes) -> LoopConfig:
        return LoopConfig(
            state_dir=self.root / f"loop-{name}",
            stream_dir=stream,
            repo=self.repo.root,
            model_name=name,
            server_url=self.server.http_url,
            datasets_root=self.datasets,
            registry=self.registry,
            metrics_url=self.server.metrics_url,
            window_s=60.0,
            feedback_delay_s=5.0,
            **changes,
        )


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_dataset):
    """A 1-epoch model on the tiny dataset, registered, exported as ``base`` v1, on a real Triton server."""
    from recops.ops.publish import publish_model
    from recops.ops.registry import LocalRegistry
    from recops.ops.retrain import register_run
    from recops.training.config import ModelConfig, TrainConfig
    from recops.training.train import fit

    root = tmp_path_factory.mktemp("loop")
    datasets = root / "datasets"
    shutil.copytree(tiny_dataset.path, datasets / tiny_dataset.path.name)
    result = fit(
        datasets / tiny_dataset.path.name,
        ModelConfig(embedding_dim=8, dense_arch=(16,), over_arch=(32,)),
        TrainConfig(epochs=1, batch_size=512),
        root / "train",
    )
    registry = LocalRegistry(root / "registry")
    version = register_run(registry, result)
    repo = ModelRepository(root / "triton")
    publish_model(registry, version, repo, "base", dataset=datasets / tiny_dataset.path.name)
    server = TritonServer(ServerConfig(repo=repo.root)).start()
    pid = server.pid
    try:
        yield Served(root, repo, server, datasets, registry.root)
    finally:
        server.stop()
    assert triton_processes(pid) == [], "server or python-backend stub left running"


def kinds(events: list[dict]) -> list[str]:
    return [e["kind"] for e in events if e["kind"] != "window"]


# ------------------------------------------------------------------ drift -> retrain -> (restart) -> canary -> promote


@pytest.fixture(scope="module")
def restarted(served):
    """Drift from window 2; the loop stops once ``retrain_finished`` is committed, a crash leaves an uncommitted
    event behind, and a new Loop on the same state dir finishes the stream."""
    stream = served.root / "stream-drift"
    write_synthetic_stream(
        StreamConfig(
            windows=6, rows=ROWS, drift_at=2, synth=SynthConfig(seed=500, covariate_drift=0.5, concept_drift=0.6)
        ),
        stream,
    )
    served.deploy("drifted")
    config = served.config(
        "drifted",
        stream,
        policy=PolicyConfig(drift_windows=2, quality_windows=2, min_new_rows=10**9, cooldown_s=0.0),
        retrain=RetrainConfig(min_windows=2),
        gate=GateConfig(slice_min_rows=100),
        canary=CanaryConfig(share=0.5, drain_s=0.1),
    )
    with Loop(config) as first:
        first.run(stop_after="retrain_finished")
        with pytest.raises(RecopsError, match="another loop runs"):
            Loop(config)
    before = read_events(config.state_dir)
    with open(config.state_dir / "events.jsonl", "a") as fh:  # written by a step that never committed its state
        fh.write(
            json.dumps({"seq": first.state.next_seq, "t": 0.0, "kind": "retrain_started", "reason": "uncommitted"})
            + "\n"
        )
    exporter = Exporter()
    with Loop(config, exporter) as second:
        second.run()
    return config, before, second, exporter


def test_loop_stops_after_retraining_with_the_step_recorded(restarted):
    config, before, _, _ = restarted
    assert kinds(before) == ["drift_detected", "drift_detected", "retrain_started", "retrain_finished"]
    started = next(e for e in before if e["kind"] == "retrain_started")
    assert started["windows"] == [2, 3] and set(started["trigger"]) >= {"drift"}
    finished = before[-1]
    assert finished["kind"] == "retrain_finished" and finished["warm_start"].startswith("warm start from v1")


def test_restart_resumes_without_a_second_retraining(restarted):
    config, before, loop, _ = restarted
    events = read_events(config.state_dir)
    assert events[: len(before)] == before, "committed events were rewritten"
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert all({"t", "kind", "reason"} <= set(e) and e["kind"] in EVENT_KINDS for e in events)
    assert kinds(events).count("retrain_started") == 1 and kinds(events).count("retrain_finished") == 1
    assert all(e["reason"] != "uncommitted" for e in events)
    assert loop.state.retrains == 1 and loop.state.step == Step.OBSERVE


def test_drifted_stream_is_retrained_canaried_and_promoted(restarted, served):
    config, _, loop, _ = restarted
    events = read_events(config.state_dir)
    order = kinds(events)
    assert order[order.index("retrain_finished") :] == [
        "retrain_finished",
        "validation_passed",
        "exported",
        "canary_started",
        "drift_detected",
        "promoted",
    ]
    validation = next(e for e in events if e["kind"] == "validation_passed")["validation"]
    assert validation["auc"]["candidate"] > validation["auc"]["production"]
    assert validation["parity"]["passed"] and validation["slices"]
    windows = {e["window"]: e for e in events if e["kind"] == "window"}
    assert set(windows[4]["arms"]) == {"1", "2"}  # the canary window: both versions served, keyed by request id
    assert windows[5]["production"] == 2 and set(windows[5]["arms"]) == {"2"}
    assert not windows[5]["drifted"], "the new model's reference is the drifted data"
    deployed = read_deploy_state(served.repo, "drifted")
    assert (deployed.production, deployed.canary, loop.state.production.repo_version) == (2, None, 2)
    assert served.repo.versions("drifted") == [1, 2] and served.server.model_ready("drifted", 2)
    # one identity chain: the served version names its registry version, which records where it serves
    registry = LocalRegistry(served.registry)
    promoted = registry.get_by_alias("production")
    assert promoted.version == loop.state.production.registry_version
    assert {(e["model"], e["version"]): e["status"] for e in promoted.served}[("drifted", 2)] == "production"
    assert (served.repo.model_dir("drifted") / "2" / "export.json").is_file()
    base = registry.get(1)
    assert {(e["model"], e["version"]): e["status"] for e in base.served}[("drifted", 1)] == "retired"


def test_loop_feeds_the_prometheus_exporter(restarted):
    _, _, loop, exporter = restarted
    sample = exporter.registry.get_sample_value
    assert sample("recops_model_info", {"version": "2"}) == 1.0
    assert sample("recops_online_impressions", {"model_version": "2"}) == ROWS
    assert sample("recops_drift_current_rows") == ROWS
    assert sample("recops_policy_triggers") == 1.0, "the policy state (one trigger) survived the restart"


def test_no_feedback_is_lost_across_the_restart(restarted):
    from recops.ops.online import read_online

    config, _, loop, _ = restarted
    logs = config.state_dir / "logs"
    for window in range(6):
        report = read_online(logs / f"predictions-{window:05d}.jsonl", logs / f"feedback-{window:05d}.jsonl")
        assert sum(w.impressions for w in report.windows) == ROWS
        assert sum(w.feedback for w in report.windows) == ROWS and report.orphan_feedback == 0
        assert (config.state_dir / loop.state.data_files[str(window)]).read_bytes() == (
            config.stream_dir / f"window-{window:05d}.tsv"
        ).read_bytes()
    assert [e["window"] for e in read_events(config.state_dir) if e["kind"] == "window"] == list(range(6))


def test_monitor_reports_the_latest_loop_window_with_triton_figures(restarted, served):
    config, _, _, _ = restarted
    out = recops("monitor", "--state-dir", str(config.state_dir), "--metrics-url", served.server.metrics_url, "--json")
    report = json.loads(out.stdout)
    assert report["rows"] == ROWS and report["torn_bytes"] == 0 and report["reports"] == 1
    assert set(report["online"]["latest_complete"]) == {"2"}  # window 5: only the promoted version served
    assert report["online"]["latest_complete"]["2"]["impressions"] == ROWS
    assert report["drift"]["drifted_features"] == [], "window 5 is compared with v2's (drifted) training data"
    triton = report["triton"]["drifted/2"]
    assert triton["requests"] > 0 and triton["failures"] == 0 and triton["mean_latency_ms"] > 0


# ------------------------------------------------------------------------------------------- canary rollback


def arm(impressions: int, auc: float | None, logloss: float | None) -> dict:
    return {"impressions": impressions, "auc": auc, "logloss": logloss}


def test_compare_arms_weighs_windows_by_impressions_and_applies_both_margins():
    config = CanaryConfig(auc_margin=0.01, logloss_margin=0.05)
    windows = [
        {"1": arm(100, 0.80, 0.40), "2": arm(100, 0.70, 0.40)},
        {"1": arm(100, 0.80, 0.40), "2": arm(300, 0.80, 0.40)},
    ]
    verdict = compare_arms(windows, "1", "2", config)
    assert verdict.details["canary"]["auc"] == pytest.approx(0.775) and verdict.details["canary"]["impressions"] == 400
    assert verdict.verdict == "rollback" and "canary AUC 0.7750 < production 0.8000 - 0.01" in verdict.reason
    good = compare_arms([{"1": arm(100, 0.80, 0.40), "2": arm(100, 0.795, 0.419)}], "1", "2", config)
    assert good.verdict == "promote" and good.reasons[0].startswith("canary v2 AUC 0.7950")
    worse_logloss = compare_arms([{"1": arm(100, 0.80, 0.40), "2": arm(100, 0.80, 0.43)}], "1", "2", config)
    assert (
        worse_logloss.verdict == "rollback"
        and "canary logloss 0.4300 > production 0.4000 x 1.05" in worse_logloss.reason
    )
    assert compare_arms([{"1": arm(100, 0.80, 0.40)}], "1", "2", config).reasons[0] == "the canary received no traffic"
    one_class = compare_arms([{"1": arm(100, 0.80, 0.40), "2": arm(5, None, None)}], "1", "2", config)
    assert one_class.reasons[0] == "the canary's online AUC/logloss is undefined (one class only)"


def test_canary_worse_than_production_is_rolled_back_and_rejected(served, tmp_path):
    """A candidate that passes the offline gate but loses online (here: the canary must beat production by a
    whole AUC point, which no model can) is rolled back; production keeps serving and the registry says why."""
    from recops.ops.registry import LocalRegistry

    stream = tmp_path / "stream"
    write_synthetic_stream(
        StreamConfig(
            windows=5, rows=ROWS, drift_at=1, synth=SynthConfig(seed=900, covariate_drift=0.5, concept_drift=0.6)
        ),
        stream,
    )
    served.deploy("rejected")
    config = served.config(
        "rejected",
        stream,  # trained on windows 1-2, canary in 3, production alone in 4
        policy=PolicyConfig(drift_windows=2, quality_windows=2, min_new_rows=10**9, cooldown_s=0.0),
        retrain=RetrainConfig(min_windows=2),
        gate=GateConfig(slice_min_rows=100),
        canary=CanaryConfig(share=0.5, drain_s=0.1, auc_margin=-1.0),
    )
    with Loop(config) as loop:
        loop.run()
    events = read_events(config.state_dir)
    order = kinds(events)
    steps = [k for k in order if k != "drift_detected"]  # drift is still reported while the canary runs
    assert steps == [
        "retrain_started",
        "retrain_finished",
        "validation_passed",
        "exported",
        "canary_started",
        "rolled_back",
    ], order  # and the latched drift does not retrain again in window 4
    rolled = next(e for e in events if e["kind"] == "rolled_back")
    assert rolled["comparison"]["verdict"] == "rollback" and "rolled back" in rolled["reason"]
    assert (rolled["version"], rolled["production"]) == (2, 1)
    deployed = read_deploy_state(served.repo, "rejected")
    assert (deployed.production, deployed.canary, loop.state.production.repo_version) == (1, None, 1)
    assert served.server.model_ready("rejected", 1) and not served.server.model_ready("rejected", 2)
    last = [e for e in events if e["kind"] == "window"][-1]
    assert set(last["arms"]) == {"1"}, "after the rollback only production serves"
    rejected = LocalRegistry(served.registry).get_by_alias("rejected")
    assert rejected.version == next(e for e in events if e["kind"] == "exported")["registry_version"]


# -------------------------------------------------------------------------------------- validation failure


def test_failed_validation_leaves_production_serving(served, tmp_path):
    """A retraining (a real Ray Tune sweep, warm-started) whose gate cannot be met changes nothing served."""
    from recops.ops.registry import LocalRegistry

    stream = tmp_path / "stream"
    write_synthetic_stream(StreamConfig(windows=2, rows=ROWS, drift_at=2, synth=SynthConfig(seed=700)), stream)
    template = tmp_path / "sweep.yaml"
    template.write_text(
        json.dumps(
            {
                "train": {"batch_size": 512},
                "search": {"embedding_lr": {"choice": [0.05]}},
                "epochs": 1,
                "num_samples": 1,
                "scheduler": "fifo",
                "max_failures": 0,
                "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
            }
        )
    )
    served.deploy("gated")
    config = served.config(
        "gated",
        stream,
        policy=PolicyConfig(min_new_rows=ROWS, cooldown_s=0.0),
        retrain=RetrainConfig(use_sweep=True, sweep_config=template, min_windows=1),
        gate=GateConfig(auc_margin=-1.0),
    )
    with Loop(config) as loop:
        loop.run()
    events = read_events(config.state_dir)
    assert kinds(events) == ["retrain_started", "retrain_finished", "validation_failed"]
    finished, failed = (next(e for e in events if e["kind"] == k) for k in ("retrain_finished", "validation_failed"))
    assert finished["method"].startswith("sweep") and finished["warm_start"].startswith("warm start")
    assert "holdout AUC" in failed["reason"] and "production v1 keeps serving" in failed["reason"]
    assert [e["window"] for e in events if e["kind"] == "window"] == [0, 1], "window 1 processed, no second retrain"
    deployed = read_deploy_state(served.repo, "gated")
    assert (deployed.production, deployed.canary, loop.state.production.repo_version) == (1, None, 1)
    assert served.repo.versions("gated") == [1], "nothing was exported"
    registry = LocalRegistry(served.registry)
    rejected = registry.get_by_alias("rejected")
    assert rejected.version == finished["registry_version"] and rejected.lineage.sweep_id
    assert rejected.lineage.parent_version == loop.state.production.registry_version


# -------------------------------------------------------------------------------------------------- demo


def test_demo_json_contract(tmp_path):
    workdir = tmp_path / "demo"
    proc = recops(
        "demo",
        "--json",
        "--no-sweep",
        "--workdir",
        str(workdir),
        "--rows",
        "6000",
        "--windows",
        "6",
        "--window-rows",
        str(ROWS),
        timeout=900,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"events", "production_before", "production_after", "report"} <= set(result)
    assert all({"t", "kind", "reason"} <= set(e) for e in result["events"])
    order = [e["kind"] for e in result["events"] if e["kind"] != "window"]
    story = [
        "drift_detected",
        "retrain_started",
        "retrain_finished",
        "validation_passed",
        "exported",
        "canary_started",
        "promoted",
    ]
    positions = [order.index(k) for k in story]  # each happened, in this order
    assert positions == sorted(positions), order
    assert (result["production_before"], result["production_after"]) == (1, 2)
    report = Path(result["report"])
    assert report.is_file() and report.read_text().count("<img src='data:image/png;base64,") == 3
    assert {p.name for p in report.parent.glob("*.png")} == {"metrics.png", "drift.png", "versions.png"}
    assert result["leftover_processes"] == [] and processes_mentioning(str(workdir)) == []
    assert len(result["predictions"]) == 5 and all(0 < p["score"] < 1 for p in result["predictions"])
