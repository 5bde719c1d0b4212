"""Ray Tune sweeps on a real local Ray: config errors before Ray starts, GPU requests failing fast, a 4-trial
ASHA sweep interrupted and resumed that registers its best model, and a killed worker resuming from its
checkpoint. Every test that starts Ray checks that no process of its Ray session is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from recops.cli import main as cli_main
from recops.errors import RecopsError
from recops.ops.registry import LocalRegistry
from recops.training.checkpoint import Checkpoint
from recops.training.dataset import ingest
from recops.training.spec import PreprocessConfig
from recops.training.sweep_config import SweepConfig, load_sweep_config
from recops.training.synth import SynthConfig, write
from tests.ray_fixtures import RAY_ENV, assert_no_ray_left, ray_env, ray_processes  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"embedding_dim": 8, "dense_arch": [16], "over_arch": [16]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep-data")
    write(SynthConfig(rows=8000, seed=3), root / "raw")
    return ingest([root / "raw" / "data.tsv"], root / "versions", config=PreprocessConfig(table_size=500)).path


@pytest.fixture(scope="module")
def cluster() -> Any:
    """One local Ray cluster for the module's sweeps (they attach with --address, as to a GPU cluster), stopped at
    the end."""
    import ray

    ray_tmp = Path(tempfile.mkdtemp(prefix="rsw-", dir="/tmp"))
    env = {**RAY_ENV, "RAY_TMPDIR": str(ray_tmp)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ray.init(
            num_cpus=3,
            include_dashboard=False,
            object_store_memory=100 * 1024**2,
            log_to_driver=False,
            logging_level="WARNING",
        )
        yield ray.get_runtime_context().gcs_address, env
    finally:
        ray.shutdown()
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    assert_no_ray_left(ray_tmp)


def sweep_yaml(path: Path, data: Path | dict, **overrides: Any) -> Path:
    config = {
        "name": "t",
        "dataset": data if isinstance(data, dict) else str(data),
        "model": dict(TINY_MODEL),
        "train": {"batch_size": 256},
        "search": {"embedding_lr": {"loguniform": [0.01, 0.2]}},
        "epochs": 2,
        "num_samples": 1,
        "scheduler": "fifo",
        "storage_path": str(path.parent / "sweeps"),
        **overrides,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def events(trial_dir: Path) -> list[dict[str, Any]]:
    path = trial_dir / "work" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def only_experiment(storage: Path) -> Path:
    found = list(storage.iterdir()) if storage.exists() else []
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_sample": 4}, "unknown key(s) ['num_sample'] in top level"),
        ({"search": {"learning_rate": {"uniform": [0.1, 0.2]}}}, "unknown key(s) ['learning_rate'] in search"),
        ({"search": {"embedding_lr": {"lognormal": [0.1, 0.2]}}}, "unknown distribution 'lognormal'"),
        ({"search": {"embedding_lr": {"loguniform": [0.1, 0.01]}}}, "needs low < high"),
        ({"search": {"embedding_lr": 0.1}}, "must be one distribution"),
        ({"search": {"dcn_low_rank": {"uniform": [4, 16]}}}, "dcn_low_rank must be integer"),
        ({"search": {"embedding_dim": {"choice": [8]}}}, "both fixed (model:/train:) and searched"),
        ({"search": {"family": {"choice": ["dlrm", "wide"]}}}, "family 'wide' is not one of"),
        ({"resources": {"workers_per_trial": 64}}, "this machine has"),
        ({"resources": {"workers_per_trial": 2}, "train": {"batch_size": 255}}, "not divisible by workers_per_trial 2"),
        ({"scheduler": {"type": "pbt"}}, "scheduler type 'pbt'"),
        ({"resources": {"placement_strategy": "SPREAD_OUT"}}, "placement_strategy 'SPREAD_OUT' not in"),
        ({"resources": {"custom_per_worker": {"CPU": 1}}}, "custom_per_worker 'CPU'"),
        ({"resources": {"custom_per_worker": {"node_a": 0}}}, "an amount > 0"),
        ({"storage_path": "s3://bucket/sweeps"}, "mount the bucket on every node"),
    ],
)
def test_bad_config_is_rejected_with_the_key_named(
    tmp_path: Path, dataset: Path, overrides: dict, message: str
) -> None:
    with pytest.raises(RecopsError) as err:
        load_sweep_config(sweep_yaml(tmp_path / "s.yaml", dataset, **overrides))
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["sweep_demo.yaml", "sweep_gpu.yaml"])
def test_shipped_configs_are_valid(name: str, dataset: Path) -> None:
    data = yaml.safe_load((REPO / "configs" / name).read_text())
    config = SweepConfig.from_dict({**data, "dataset": str(dataset)}, local=False)  # their dataset paths are examples
    assert config.search and config.scheduler.type == "asha"


def test_missing_dataset_version_fails_in_cli_before_ray_starts(
    tmp_path: Path, dataset: Path, ray_env: Path, capsys: pytest.CaptureFixture
) -> None:
    config = sweep_yaml(tmp_path / "s.yaml", {"root": str(dataset.parent), "version": "0123abcd"})
    assert cli_main(["sweep", "--config", str(config), "--json"]) == 2
    err = capsys.readouterr().err
    assert "dataset version '0123abcd' does not exist" in err and dataset.name in err  # names the versions there
    assert not list(ray_env.iterdir()) and not (tmp_path / "sweeps").exists()  # no Ray session, no experiment


def cli(*args: str, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "recops.cli", "sweep", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_gpu_request_on_cpu_machine_fails_fast(
    tmp_path: Path, dataset: Path, ray_env: Path, capsys: pytest.CaptureFixture
) -> None:
    """A local sweep (its own Ray in this process, stopped afterwards) whose trials want a GPU this machine lacks."""
    config = sweep_yaml(tmp_path / "s.yaml", dataset, resources={"gpus_per_worker": 1})
    assert cli_main(["sweep", "--config", str(config), "--registry", str(tmp_path / "reg")]) == 2
    err = capsys.readouterr().err
    assert "asks for 1 GPU" in err and "has 0" in err and "gpus_per_worker: 0" in err, err[-2000:]
    assert list(ray_env.iterdir()) and not (tmp_path / "sweeps").exists()  # Ray ran; no experiment or trial started


@pytest.mark.slow
def test_asha_sweep_interrupted_then_resumed_registers_best(tmp_path: Path, dataset: Path, cluster: Any) -> None:
    address, env = cluster
    config = sweep_yaml(
        tmp_path / "s.yaml",
        dataset,
        num_samples=4,
        max_concurrent_trials=2,
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
        search={"embedding_lr": {"loguniform": [0.005, 0.3]}, "family": {"choice": ["dlrm", "dcn"]}},
    )
    common = ("--address", address, "--registry", str(tmp_path / "reg"), "--json")
    first = cli("--config", str(config), *common, env=env)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:  # a 3rd trial starts only once one of 2 ended
            if sum(bool(events(t)) for t in (tmp_path / "sweeps").glob("*/trials/*")) >= 3:
                break
            time.sleep(0.2)
        first.send_signal(signal.SIGTERM)  # handled like Ctrl-C: Tune saves its state and stops
        _, err = first.communicate(timeout=180)
    finally:
        first.kill()
    assert first.returncode == 130, err[-2000:]
    experiment = only_experiment(tmp_path / "sweeps")
    assert f"recops sweep --resume {experiment}" in err
    interrupted = json.loads((experiment / "sweep_summary.json").read_text())
    assert interrupted["status"] == "interrupted"
    done = [t["trial_id"] for t in interrupted["ranking"] if t["status"] in ("finished", "stopped", "early_stopped")]
    assert done, interrupted["ranking"]
    before = {t: events(experiment / "trials" / t) for t in done}

    resumed = cli("--resume", str(experiment), *common, env=env)
    stdout, err = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, err[-3000:]
    out = json.loads(stdout.strip().splitlines()[-1])
    assert (out["status"], out["num_trials"], out["num_errors"], out["experiment_dir"]) == (
        "completed",
        4,
        0,
        str(experiment),
    )
    for trial_id, old in before.items():  # finished trials were not run again
        assert events(experiment / "trials" / trial_id) == old

    records = {p.parent.name: json.loads(p.read_text()) for p in experiment.glob("trials/*/trial_record.json")}
    assert len(records) == 4 and {r["status"] for r in records.values()} <= {"finished", "stopped", "early_stopped"}
    starts = [e for t in records for e in events(experiment / "trials" / t) if e["event"] == "start"]
    assert len({e["pid"] for e in starts}) < len(starts), starts  # a trial process ran more than one trial
    best_id = max(records, key=lambda t: records[t]["best"]["auc"])
    best = records[best_id]
    assert out["best_trial"] == best_id and out["best_auc"] == best["best"]["auc"]
    assert [h["epoch"] for h in best["history"]] == list(range(1, len(best["history"]) + 1))
    assert best["dataset"]["version"] == dataset.name and set(best["params"]) == {"embedding_lr", "family"}
    env = best["environment"]
    assert env["libraries"]["torch"].startswith("2.13") and env["libraries"]["ray"] == "2.60.0"
    assert env["code"]["git_sha"] and env["hardware"]["cpu_count"] == os.cpu_count()

    version = LocalRegistry(tmp_path / "reg").get_by_alias("candidate")
    assert version.version == out["model_version"] == 1
    assert (version.lineage.sweep_id, version.lineage.trial_id) == (experiment.name, best_id)
    assert version.dataset.version == dataset.name and version.metrics["auc"] == out["best_auc"]
    assert version.fingerprint == Checkpoint.open(version.checkpoint).fingerprint
    assert version.params["searched"] == best["params"] and version.lineage.libraries["torchrec"]
    restored = Checkpoint.open(version.checkpoint).meta
    assert restored.metrics["auc"] == out["best_auc"] and restored.model.family == best["params"]["family"]


@pytest.mark.slow
def test_killed_worker_resumes_from_its_checkpoint(tmp_path: Path, dataset: Path, cluster: Any) -> None:
    """Two DMP workers per trial; rank 0 is SIGKILLed after epoch 1: Train restarts both from epoch 1's checkpoint."""
    address, env = cluster
    config = sweep_yaml(
        tmp_path / "s.yaml",
        dataset,
        epochs=4,
        max_failures=1,
        train={"batch_size": 256, "sharding_type": "data_parallel"},
        resources={"workers_per_trial": 2, "cpus_per_worker": 1},
    )
    sweep = cli("--config", str(config), "--address", address, "--no-register", "--json", env=env)
    killed = None
    try:
        deadline = time.monotonic() + 300
        while killed is None and time.monotonic() < deadline and sweep.poll() is None:
            for trial in (tmp_path / "sweeps").glob("*/trials/*"):
                epochs = [e for e in events(trial) if e["event"] == "epoch"]
                if epochs:  # rank 0, right after Train took epoch 1's checkpoint
                    killed = epochs[0]["pid"]
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.02)
        stdout, err = sweep.communicate(timeout=300)
    finally:
        sweep.kill()
    assert killed and sweep.returncode == 0, err[-3000:]
    out = json.loads(stdout.strip().splitlines()[-1])
    assert (out["status"], out["num_trials"], out["num_errors"]) == ("completed", 1, 0)
    record = json.loads((Path(out["experiment_dir"]) / "trials" / out["best_trial"] / "trial_record.json").read_text())
    assert record["status"] == "finished" and [h["epoch"] for h in record["history"]] == [1, 2, 3, 4]
    first, second = record["attempts"]
    assert first["pid"] == killed != second["pid"] and first["world_size"] == second["world_size"] == 2
    assert second["resumed_at_epoch"] >= 1  # restarted from a checkpoint, not from scratch
    assert Checkpoint.open(out["best_checkpoint"]).meta.world_size == 2


def test_a_stopped_trials_placement_group_is_released(tmp_path: Path, cluster: Any, monkeypatch: Any) -> None:
    """ReleaseStoppedTrials for a multi-worker trial Tune ended: the placement group its start event names is removed
    after the grace period, and a "released" event says recops did it."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from recops.training import sweep_callbacks
    from recops.training.sweep_records import log_event, read_events, trial_work_dir

    monkeypatch.setattr(sweep_callbacks, "RELEASE_GRACE_S", 0.0)
    group = placement_group([{"CPU": 1}])
    ray.get(group.ready(), timeout=60)
    work = trial_work_dir(tmp_path, "t1")
    log_event(work, "start", placement_group=group.id.hex())
    callback = sweep_callbacks.ReleaseStoppedTrials()
    callback.on_trial_complete(0, [], SimpleNamespace(trial_id="t1", path=str(tmp_path / "tune" / "t1")))
    callback.on_step_end(0, [])
    assert placement_group_table(group)["state"] == "REMOVED"
    assert [e["by"] for e in read_events(work) if e["event"] == "released"] == ["recops"]


def test_warm_start_adopts_the_parent_and_seeds_its_weights(tmp_path: Path, dataset: Path) -> None:
    """Without Ray: what each warm-started trial does before run_worker (adopt the architecture, seed 'latest')."""

    from recops.training.config import ModelConfig, TrainConfig
    from recops.training.sweep import _adopt_warm_start
    from recops.training.sweep_trial import prepare_work_dir
    from recops.training.train import fit

    cfg = TrainConfig(epochs=1, batch_size=256, threads=1, device="cpu")
    parent = Path(fit(dataset, ModelConfig.from_dict(TINY_MODEL), cfg, tmp_path / "parent").checkpoint)
    config = load_sweep_config(sweep_yaml(tmp_path / "s.yaml", dataset, model={}, warm_start=1))
    with pytest.raises(RecopsError, match="warm_start takes model 1's architecture"):
        _adopt_warm_start(
            load_sweep_config(sweep_yaml(tmp_path / "c.yaml", dataset, model={"embedding_dim": 16}, warm_start=1)),
            parent,
        )
    adopted, source = _adopt_warm_start(config, parent)
    assert source == parent.resolve() and {k: adopted.model[k] for k in TINY_MODEL} == TINY_MODEL

    work = tmp_path / "trial" / "work"
    assert prepare_work_dir(work, None) == 0 and not (work / "checkpoints" / "latest").exists()
    model, train = adopted.configs({"embedding_lr": 0.05})
    result = fit(dataset, model, replace(train, epochs=1, threads=1), work, warm_start=source)  # seeds 'latest'
    assert [h["epoch"] for h in result.history] == [1]
    seeded = Checkpoint.open(work / "checkpoints" / "latest").meta
    assert seeded.warm_start_from == str(parent.resolve()) and seeded.dataset.version == Path(dataset).name
    scratch = fit(dataset, model, replace(train, epochs=1, threads=1), tmp_path / "scratch")
    assert result.val_auc > scratch.val_auc, "the warm start carried the parent's weights"


def own_ray_tmp(driver: int) -> Path | None:
    """The Ray temp directory a sweep driver made for its local Ray (``<tmp>/.ray.tmp-<pid>-*``), once it exists."""
    found = list(Path(tempfile.gettempdir()).glob(f".ray.tmp-{driver}-*"))
    return found[0] if found else None


def test_a_killed_sweep_driver_takes_its_local_ray_with_it(tmp_path: Path, dataset: Path) -> None:
    """SIGKILL `recops sweep` while its trial trains: no process of its local Ray (GCS, raylet, agents, workers) is
    left 10 s later, and the next sweep removes the killed one's Ray temp directory before starting its own."""
    env = {**RAY_ENV, "RAY_TMPDIR": ""}  # empty: the sweep makes (and owns) its Ray temp directory
    config = sweep_yaml(tmp_path / "s.yaml", dataset, epochs=50)
    sweep = cli("--config", str(config), "--no-register", "--json", env=env)
    try:
        deadline = time.monotonic() + 240
        while not list((tmp_path / "sweeps").glob("*/trials/*/work/events.jsonl")) and time.monotonic() < deadline:
            assert sweep.poll() is None, sweep.communicate()[1][-3000:]
            time.sleep(0.2)
        ray_tmp = own_ray_tmp(sweep.pid)
        assert ray_tmp is not None and len(ray_processes(ray_tmp)) >= 4, "GCS, raylet and workers run"
    finally:
        sweep.kill()
        sweep.communicate()
    deadline = time.monotonic() + 10
    while ray_processes(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_processes(ray_tmp) == [], "Ray processes outlived the killed sweep"

    second = cli("--config", str(config), "--no-register", "--json", env=env)
    try:
        deadline = time.monotonic() + 120
        while own_ray_tmp(second.pid) is None and time.monotonic() < deadline and second.poll() is None:
            time.sleep(0.1)
        assert not ray_tmp.exists(), "the killed sweep's Ray temp directory is collected by the next sweep"
    finally:
        second.kill()
        second.communicate()
    assert_no_ray_left(own_ray_tmp(second.pid))
