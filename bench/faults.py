"""Fault injection: recops commands killed at random moments, then the invariants that must hold after a crash.

Scenarios: ``ingest``, ``train``, ``train_nproc2``, ``sweep``, ``export``, ``deploy``. Each runs its command
``--kills`` times with a fault: SIGKILL or SIGTERM at a moment drawn uniformly over the command's clean run time,
or a full disk (a random file-size limit in the child, ``RLIMIT_FSIZE``: a write past it fails with EFBIG, as on a
full disk; not for the sweep, whose Ray daemons inherit the limit). After every fault:

* no process of the command survives 15 s (each one inherits a marker in its environment: ranks, Ray, stubs);
* what existed before (dataset, checkpoints, registry versions, repository versions) loads and matches its digest,
  and nothing half-written is visible (every dataset, checkpoint and version directory in sight is complete);
* deploy: while the command ran, no request to the model name was answered by an unchecked version or with a
  non-finite score; after it, the server holds no unchecked version under the model name, and the next command
  (``recops deploy --status``) restores the committed deployment, whose production answers finite scores.

Every ``rerun_every``-th fault of a scenario is followed by the command run to completion: it must succeed (or, for
a deployment the checks refuse, fail cleanly with exit 2), and leave no temporary file or directory behind
(``.*.tmp-<pid>-*``, staging models, journals, Ray temp directories of the killed sweeps).

``python -m recops.bench.faults [--kills N] [--scenarios ingest,deploy] [--seed S] [--quick] [--results-dir DIR]``
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recops.bench.common import bench_parser, format_table, run_main, write_result
from recops.errors import RecopsError
from recops.processes import marked

NAME = "faults"
MARK_ENV = "RECOPS_FAULT_MARK"
SURVIVOR_GRACE_S = 15.0
TEMP_NAME = re.compile(r"\..+\.tmp-\d+-.*|\.check-.*|\.deploy-journal\.json")
FAULT_WEIGHTS = {"sigkill": 0.6, "sigterm": 0.2, "disk_full": 0.2}
MODEL = "ctr"


# ---- one faulted run --------------------------------------------------------------------------------------------
@dataclass
class Attempt:
    """One run of a command: the fault it got, when, and how it ended."""

    fault: str
    at_s: float | None = None  # when the signal was sent (None: the command ended first, or disk_full)
    returncode: int | None = None
    seconds: float = 0.0
    output: str = ""
    pid: int = 0
    survivors: list[int] = field(default_factory=list)

    @property
    def struck(self) -> bool:
        """The fault hit the running command (a signal sent while it ran, or a write limit it ran into)."""
        return self.at_s is not None or (self.fault == "disk_full" and self.returncode != 0)

    def json_out(self) -> dict[str, Any]:
        lines = [line for line in self.output.strip().splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {}


def run_command(
    argv: list[str],
    cwd: Path,
    fault: str = "none",
    delay_s: float = 0.0,
    file_limit: int = 0,
    env: dict[str, str] | None = None,
    timeout_s: float = 600.0,
) -> Attempt:
    """Run ``recops <argv>`` with ``fault`` (none | sigkill | sigterm after ``delay_s`` | disk_full at
    ``file_limit`` bytes); wait until it and every process it started are gone (survivors are recorded, killed)."""
    mark = uuid.uuid4().hex
    attempt = Attempt(fault)
    limit = (
        (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))) if fault == "disk_full" else None
    )
    with tempfile.TemporaryFile("w+") as log:
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "recops.cli", *argv],
            cwd=cwd,
            env={**os.environ, **(env or {}), MARK_ENV: mark},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=limit,
        )
        attempt.pid = proc.pid
        if fault in ("sigkill", "sigterm"):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=delay_s)
            if proc.poll() is None:
                attempt.at_s = round(time.monotonic() - start, 3)
                proc.send_signal(signal.SIGKILL if fault == "sigkill" else signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            attempt.output = f"(killed: still running after {timeout_s:.0f} s)\n"
        attempt.returncode, attempt.seconds = proc.returncode, round(time.monotonic() - start, 3)
        log.seek(0)
        attempt.output += log.read()[-4000:]
    attempt.survivors = _reap(mark)
    return attempt


def _reap(mark: str) -> list[int]:
    """The marked processes still alive after the grace period (then killed)."""
    deadline = time.monotonic() + SURVIVOR_GRACE_S
    while marked(mark, MARK_ENV) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = marked(mark, MARK_ENV)
    for pid in survivors:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return survivors


# ---- invariants -------------------------------------------------------------------------------------------------
@dataclass
class Tally:
    """What a scenario tried and found."""

    scenario: str
    faults: Counter = field(default_factory=Counter)
    struck: int = 0
    invariants: int = 0
    reruns: int = 0
    violations: list[str] = field(default_factory=list)
    clean_run_s: float = 0.0
    seconds: float = 0.0

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        self.invariants += 1
        if not ok:
            self.violations.append(f"{self.scenario}: {what}" + (f" ({detail})" if detail else ""))
        return ok

    def holds(self, what: str, fn) -> bool:
        """``fn()`` runs without raising (e.g. a checkpoint that loads and verifies)."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - any failure is the violation reported
            return self.check(what, False, f"{type(exc).__name__}: {str(exc)[:300]}")
        return self.check(what, True)

    def row(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "faults": sum(self.faults.values()),
            "sigkill": self.faults["sigkill"],
            "sigterm": self.faults["sigterm"],
            "disk_full": self.faults["disk_full"],
            "struck_while_running": self.struck,
            "reruns": self.reruns,
            "invariants_checked": self.invariants,
            "violations": len(self.violations),
            "clean_run_s": round(self.clean_run_s, 1),
            "seconds": round(self.seconds, 1),
        }


def digest(path: Path) -> str:
    """sha256 over the relative paths and contents of every file under ``path``."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode() + b"\0" + file.read_bytes())
    return h.hexdigest()


def largest_file(path: Path) -> int:
    """Bytes in the largest file under ``path`` (a scale for file-size limits)."""
    return max((p.stat().st_size for p in Path(path).rglob("*") if p.is_file()), default=0)


def temp_leftovers(*folders: Path) -> list[str]:
    """Temporary entries (any writer's) in ``folders`` and their sub-directories one level down."""
    found = []
    for folder in folders:
        for entry in [*Path(folder).glob("*"), *Path(folder).glob("*/*")] if Path(folder).is_dir() else []:
            if TEMP_NAME.fullmatch(entry.name):
                found.append(str(entry))
    return found


def registry_intact(registry: Path) -> None:
    from recops.ops.registry import LocalRegistry

    reg = LocalRegistry(registry)
    for version in reg.list():
        reg.get(version.version)
    if reg.broken():
        raise RecopsError(f"broken registry versions: {reg.broken()}")


# ---- scenarios --------------------------------------------------------------------------------------------------
class Scenario:
    """A command, the state it must never corrupt, and what a completed run leaves."""

    name = ""
    faults = ("sigkill", "sigterm", "disk_full")
    rerun_every = 1
    term_timeout_s = 60.0

    def __init__(self, work: Path, shared: Shared, rng: random.Random):
        self.work, self.shared, self.rng = work, shared, rng
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.tally = Tally(self.name)
        self.killed_pids: list[int] = []

    def setup(self) -> None:
        """Build what the command needs and run it once to completion (its time sets the kill moments)."""
        self.before()
        self.clean_run()

    def clean_run(self) -> None:
        attempt = self.run("none")
        self.tally.clean_run_s = attempt.seconds
        self.after_rerun(attempt)
        if attempt.returncode != 0:
            raise RecopsError(f"fault scenario {self.name}: the clean run failed:\n{attempt.output[-2000:]}")

    def argv(self, completing: bool) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {}

    def file_limit(self) -> int:
        return self.rng.randint(0, 1 << 20)

    def run(self, fault: str, delay_s: float = 0.0) -> Attempt:
        limit = self.file_limit() if fault == "disk_full" else 0
        timeout = self.term_timeout_s if fault == "sigterm" else 900.0
        return run_command(self.argv(fault == "none"), self.work, fault, delay_s, limit, self.env(), timeout)

    def before(self) -> None:
        """Prepare one faulted run (e.g. remove a finished result so that the command has work to do)."""

    def after_fault(self, attempt: Attempt) -> None:
        raise NotImplementedError

    def after_rerun(self, attempt: Attempt) -> None:
        raise NotImplementedError

    def common(self, attempt: Attempt) -> None:
        self.tally.check("no process of the command survives", not attempt.survivors, f"pids {attempt.survivors}")
        if attempt.fault == "sigterm" and attempt.at_s is not None:
            self.tally.check("SIGTERM ends the command", not attempt.output.startswith("(killed"), attempt.output[:200])

    def completed(self, attempt: Attempt, *folders: Path) -> None:
        self.common(attempt)
        self.tally.check("a rerun completes", attempt.returncode == 0, attempt.output[-1500:])
        left = temp_leftovers(*folders)
        self.tally.check("no temporary file or directory is left after the rerun", not left, ", ".join(left[:5]))

    def inject(self, kills: int) -> Tally:
        start = time.monotonic()
        for i in range(kills):
            fault = self.rng.choices(list(self.faults), [FAULT_WEIGHTS[f] for f in self.faults])[0]
            self.before()
            attempt = self.run(fault, self.rng.uniform(0.0, self.tally.clean_run_s))
            self.tally.faults[fault] += 1
            self.tally.struck += attempt.struck
            self.killed_pids.append(attempt.pid)
            self.common(attempt)
            self.after_fault(attempt)
            if (i + 1) % self.rerun_every == 0 or i == kills - 1:
                self.tally.reruns += 1
                self.after_rerun(self.run("none"))
        self.tally.seconds = time.monotonic() - start
        return self.tally


class Shared:
    """Inputs several scenarios use, made once: raw rows, a dataset, a trained checkpoint, ONNX versions."""

    def __init__(self, work: Path, rows: int, deploy_sources: list[Path] | None = None):
        self.work, self.rows = work, rows
        self._deploy_sources = deploy_sources
        self._cache: dict[str, Any] = {}

    def raw(self, seed: int) -> Path:
        from recops.training.synth import SynthConfig, write

        out = self.work / f"raw-{seed}"
        if not (out / "data.tsv").is_file():
            write(SynthConfig(rows=self.rows, seed=seed), out)
        return out / "data.tsv"

    @property
    def datasets(self) -> Path:
        return self.work / "datasets"

    def dataset(self) -> Path:
        if "dataset" not in self._cache:
            from recops.training.dataset import ingest
            from recops.training.spec import PreprocessConfig

            ds = ingest([self.raw(1)], self.datasets, config=PreprocessConfig(table_size=1000))
            self._cache["dataset"] = ds.path
        return self._cache["dataset"]

    def checkpoint(self) -> Path:
        if "checkpoint" not in self._cache:
            from recops.training.checkpoint import Checkpoint
            from recops.training.config import ModelConfig, TrainConfig
            from recops.training.train import fit

            out = self.work / "trained"
            if not Checkpoint.exists(out / "checkpoints" / "best"):
                fit(self.dataset(), ModelConfig(), TrainConfig(epochs=1, batch_size=1024, threads=1), out)
            self._cache["checkpoint"] = out / "checkpoints" / "best"
        return self._cache["checkpoint"]

    def deploy_sources(self) -> list[Path]:
        """Two good version directories to deploy (model.onnx + export.json + preprocess.json)."""
        if self._deploy_sources is None:
            from recops.serving.export import export_onnx

            self._deploy_sources = [export_onnx(self.checkpoint(), self.work / f"export-{i}").directory for i in (1, 2)]
        return self._deploy_sources


class IngestScenario(Scenario):
    name = "ingest"

    def setup(self) -> None:
        self.before_digest = {self.shared.dataset(): digest(self.shared.dataset())}
        self.input = self.shared.raw(2)
        self.version: str | None = None
        super().setup()

    def file_limit(self) -> int:
        return self.rng.randint(0, 2 * largest_file(self.shared.dataset()))

    def argv(self, completing: bool) -> list[str]:
        root = str(self.shared.datasets)
        return ["data", "ingest", "--input", str(self.input), "--out", root, "--table-size", "1000", "--json"]

    def before(self) -> None:
        if self.version:  # so that the run has work to do
            shutil.rmtree(self.shared.datasets / self.version, ignore_errors=True)

    def after_fault(self, attempt: Attempt) -> None:
        from recops.training.dataset import Dataset

        for path, value in self.before_digest.items():
            self.tally.check("the previous dataset matches its digest", digest(path) == value, str(path))
            self.tally.holds("the previous dataset opens", lambda: Dataset.open(path).split("train"))  # noqa: B023
        for entry in self.shared.datasets.iterdir():
            if not entry.name.startswith("."):
                self.tally.holds("every visible dataset directory is complete", lambda: Dataset.open(entry))  # noqa: B023

    def after_rerun(self, attempt: Attempt) -> None:
        from recops.training.dataset import Dataset

        self.completed(attempt, self.shared.datasets)
        self.version = attempt.json_out().get("version") or self.version
        self.tally.holds("the rerun's dataset opens", lambda: Dataset.open(self.shared.datasets / self.version))


class TrainScenario(Scenario):
    name = "train"
    nproc = 1

    def setup(self) -> None:
        self.out, self.registry = self.work / "run", self.work / "registry"
        super().setup()

    def argv(self, completing: bool) -> list[str]:
        return [
            "train",
            *("--data", str(self.shared.dataset()), "--out", str(self.out), "--registry", str(self.registry)),
            *("--epochs", "2", "--no-resume", "--nproc", str(self.nproc), "--batch-size", "1024", "--json"),
        ]

    def file_limit(self) -> int:
        return self.rng.randint(0, 2 * largest_file(self.out / "checkpoints" / "best"))

    def after_fault(self, attempt: Attempt) -> None:
        from recops.training.checkpoint import Checkpoint

        if self.nproc > 1:
            before = {p: p.stat().st_mtime_ns for p in self.out.rglob("*") if p.is_file()}
            time.sleep(2.0)
            after = {p: p.stat().st_mtime_ns for p in self.out.rglob("*") if p.is_file()}
            self.tally.check("nothing writes to --out after the kill", before == after)
        for which in ("best", "latest"):
            path = self.out / "checkpoints" / which
            self.tally.holds(f"checkpoint {which} loads and matches its sha256", lambda: Checkpoint.open(path).load())  # noqa: B023
        self.tally.holds("every registry version loads", lambda: registry_intact(self.registry))

    def after_rerun(self, attempt: Attempt) -> None:
        from recops.training.checkpoint import Checkpoint

        best = self.out / "checkpoints" / "best"
        self.completed(attempt, self.out, self.out / "checkpoints", self.registry / "versions", self.registry)
        self.tally.holds("the rerun's best checkpoint verifies", lambda: Checkpoint.open(best).verify())
        self.tally.holds("every registry version loads", lambda: registry_intact(self.registry))


class TrainNproc2Scenario(TrainScenario):
    name = "train_nproc2"
    nproc = 2


class SweepScenario(Scenario):
    name = "sweep"
    faults = ("sigkill", "sigterm")
    term_timeout_s = 180.0  # SIGTERM stops a sweep gracefully (Tune saves its state)

    def setup(self) -> None:
        import yaml

        self.registry, self.storage = self.work / "registry", self.work / "sweeps"
        self.config = self.work / "sweep.yaml"
        config = {
            "name": "faults",
            "dataset": str(self.shared.dataset()),
            "model": {"embedding_dim": 8, "dense_arch": [16], "over_arch": [16]},
            "train": {"batch_size": 1024},
            "search": {"embedding_lr": {"loguniform": [0.01, 0.2]}},
            "epochs": 2,
            "num_samples": 2,
            "scheduler": "fifo",
            "storage_path": str(self.storage),
        }
        self.config.write_text(yaml.safe_dump(config))
        super().setup()

    def env(self) -> dict[str, str]:
        return {"RAY_TMPDIR": ""}  # the sweep makes its own Ray temp dir (and collects those of killed sweeps)

    def argv(self, completing: bool) -> list[str]:
        """A faulted run starts a sweep; the completing run resumes the last one that can be resumed."""
        from ray.tune import Tuner

        experiments = sorted(self.storage.glob("*/tune"), key=lambda p: p.stat().st_mtime) if completing else []
        resumable = [p.parent for p in experiments if Tuner.can_restore(str(p))]
        source = ["--resume", str(resumable[-1])] if resumable else ["--config", str(self.config)]
        return ["sweep", *source, "--registry", str(self.registry), "--json"]

    def after_fault(self, attempt: Attempt) -> None:
        self.tally.holds("every registry version loads", lambda: registry_intact(self.registry))

    def after_rerun(self, attempt: Attempt) -> None:
        ray_tmp = [str(p) for pid in self.killed_pids for p in Path(tempfile.gettempdir()).glob(f".ray.tmp-{pid}-*")]
        self.completed(attempt, self.registry, self.registry / "versions")
        self.tally.check("the killed sweeps' Ray temp directories are collected", not ray_tmp, ", ".join(ray_tmp))
        self.tally.check("the rerun's sweep completes", attempt.json_out().get("status") == "completed")
        self.tally.holds("every registry version loads", lambda: registry_intact(self.registry))


class ExportScenario(Scenario):
    name = "export"

    def setup(self) -> None:
        self.repo, self.registry = self.work / "repo", self.work / "registry"
        self.digests: dict[Path, str] = {}
        super().setup()

    def argv(self, completing: bool) -> list[str]:
        return [
            "export",
            *("--checkpoint", str(self.shared.checkpoint()), "--repo", str(self.repo), "--name", MODEL),
            *("--registry", str(self.registry), "--json"),
        ]

    def file_limit(self) -> int:
        return self.rng.randint(0, 2 * largest_file(self.shared.checkpoint()))

    def versions_complete(self) -> None:
        from recops.serving.onnx_model import EXPORT_FILE, PREPROCESS_FILE
        from recops.serving.repository import CONFIG_FILE, ONNX_FILE, PYTHON_MODEL_FILE, ModelRepository, read_signature

        repo = ModelRepository(self.repo)
        for version in repo.versions(MODEL):
            folder = repo.model_dir(MODEL) / str(version)
            missing = [
                f for f in (ONNX_FILE, PYTHON_MODEL_FILE, EXPORT_FILE, PREPROCESS_FILE) if not (folder / f).is_file()
            ]
            if missing:
                raise RecopsError(f"version {version} lacks {missing}")
            read_signature(folder / ONNX_FILE)
        if not (repo.model_dir(MODEL) / CONFIG_FILE).is_file():
            raise RecopsError("config.pbtxt is missing")

    def after_fault(self, attempt: Attempt) -> None:
        for folder, value in self.digests.items():
            self.tally.check("every earlier version matches its digest", digest(folder) == value, str(folder))
        self.tally.holds("every visible version is complete", self.versions_complete)
        self.tally.holds("every registry version loads", lambda: registry_intact(self.registry))

    def after_rerun(self, attempt: Attempt) -> None:
        model = self.repo / MODEL
        self.completed(attempt, self.repo, model)
        self.tally.holds("every visible version is complete", self.versions_complete)
        self.digests = {p: digest(p) for p in model.iterdir() if p.name.isdigit()}


class DeployScenario(Scenario):
    name = "deploy"

    def setup(self) -> None:
        from recops.serving.deploy import DeployConfig, Deployer
        from recops.serving.repository import ONNX_FILE, ModelRepository
        from recops.serving.server import ServerConfig, TritonServer

        self.repo = ModelRepository(self.work / "repo")
        for source in self.shared.deploy_sources():
            self.repo.add_version(MODEL, source / ONNX_FILE, extra_files=list(source.glob("*.json")))
        self.good = set(self.repo.versions(MODEL))
        self.bad = {self.nan_version()}
        self.server = TritonServer(ServerConfig(repo=self.repo.root)).start()
        Deployer(self.server, self.repo, MODEL, DeployConfig(drain_s=0.2)).deploy(min(self.good))
        self.action = ["--version", str(max(self.good))]
        self.clean_run()

    def nan_version(self) -> int:
        """A hand-made version (no export, no gate) whose float weights are all NaN: it must never serve."""
        import onnx

        from recops.serving.repository import ONNX_FILE

        source = self.repo.model_dir(MODEL) / str(min(self.repo.versions(MODEL)))
        version = self.repo.next_version(MODEL)
        target = self.repo.model_dir(MODEL) / str(version)
        shutil.copytree(source, target)
        model = onnx.load(str(target / ONNX_FILE))
        for tensor in model.graph.initializer:
            if tensor.data_type == onnx.TensorProto.FLOAT:
                nan = np.full(tuple(tensor.dims), np.nan, np.float32)
                tensor.CopyFrom(onnx.numpy_helper.from_array(nan, tensor.name))
        onnx.save(model, str(target / ONNX_FILE))
        return version

    def close(self) -> None:
        self.server.stop()

    def committed(self):
        from recops.serving.deploy import committed_state

        return committed_state(self.repo, MODEL)

    def before(self) -> None:
        """Draw the next move from the committed state: deploy (a good or the NaN version, maybe as a canary),
        promote or roll back."""
        state = self.committed()
        if state.canary is not None:
            self.action = [self.rng.choice(["--promote", "--rollback"])]
            return
        others = sorted((self.good | self.bad) - set(state.loaded))
        choice = self.rng.choice([*others, "rollback"])
        if choice == "rollback":
            self.action = ["--rollback"]
        else:
            canary = ["--canary", "0.3"] if self.rng.random() < 0.4 else []
            self.action = ["--version", str(choice), *canary]

    @property
    def target(self) -> list[str]:
        return ["--name", MODEL, "--repo", str(self.repo.root), "--url", self.server.http_url, "--json"]

    def argv(self, completing: bool) -> list[str]:
        return ["deploy", *self.action, *self.target, "--drain", "0.2"]

    def file_limit(self) -> int:
        from recops.serving.deploy import state_path

        return self.rng.randint(0, 2 * state_path(self.repo, MODEL).stat().st_size)

    def run(self, fault: str, delay_s: float = 0.0) -> Attempt:
        """The command, while a client asks the model name (no version) all the time."""
        answers: Counter = Counter()
        stop = threading.Event()
        probe = threading.Thread(target=self._probe, args=(answers, stop))
        probe.start()
        try:
            attempt = super().run(fault, delay_s)
        finally:
            stop.set()
            probe.join()
        wrong = {k: n for k, n in answers.items() if k != "error" and (int(k[0]) not in self.good or not k[1])}
        self.tally.check("no request reaches an unchecked version or gets a non-finite score", not wrong, str(wrong))
        return attempt

    def _probe(self, answers: Counter, stop: threading.Event) -> None:
        from recops.serving.client import Predictor
        from recops.serving.onnx_model import ExportRecord

        record = ExportRecord.read(self.repo.model_dir(MODEL) / str(min(self.good)))
        inputs = record.layout.random_inputs(4, np.random.default_rng(0)) if record else self._zero_inputs()
        with Predictor(self.server.http_url, MODEL, timeout_s=30) as predictor:
            while not stop.is_set():
                try:
                    result = predictor.predict(inputs)
                    answers[
                        (result.model_versions[0], bool(np.isfinite(next(iter(result.outputs.values()))).all()))
                    ] += 1
                except RecopsError:
                    answers["error"] += 1
                stop.wait(0.02)

    def _zero_inputs(self) -> dict[str, np.ndarray]:
        from recops.serving.repository import ONNX_FILE, read_signature

        inputs, _, _ = read_signature(self.repo.model_dir(MODEL) / str(min(self.good)) / ONNX_FILE)
        return {s.name: np.zeros((4, *s.dims[1:]), np.float32 if s.dtype == "FP32" else np.int64) for s in inputs}

    def loaded_under_the_name(self) -> set[int]:
        from recops.serving.journal import loaded

        return loaded(self.server, MODEL)[0]

    def after_fault(self, attempt: Attempt) -> None:
        held = self.loaded_under_the_name()
        self.tally.check("the server holds no unchecked version under the model name", held <= self.good, str(held))
        status = run_command(["deploy", "--status", *self.target], self.work)
        self.tally.check("the next command recovers the deployment", status.returncode == 0, status.output[-1500:])
        self.check_serving()

    def check_serving(self) -> None:
        from recops.serving.client import Predictor
        from recops.serving.journal import Journal

        state = self.committed()
        self.tally.check("production is a checked version", state.production in self.good, str(state.production))
        self.tally.check("nothing is in flight after recovery", Journal(self.repo, MODEL).read() is None)
        held = self.loaded_under_the_name()
        self.tally.check("the server holds exactly the committed versions", held == set(state.loaded), f"{held}")
        staged = (self.repo.root / f".check-{MODEL}").exists()
        self.tally.check("the staging model is gone", not staged)

        def finite() -> None:
            with Predictor(self.server.http_url, MODEL, timeout_s=30) as predictor:
                scores = predictor.predict_arrays(self._probe_inputs(), model_version=state.production)
            if not np.isfinite(scores).all():
                raise RecopsError("non-finite production scores")

        self.tally.holds("production answers finite scores", finite)

    def _probe_inputs(self) -> dict[str, np.ndarray]:
        from recops.serving.onnx_model import ExportRecord

        record = ExportRecord.read(self.repo.model_dir(MODEL) / str(min(self.good)))
        return record.layout.random_inputs(8, np.random.default_rng(1)) if record else self._zero_inputs()

    def after_rerun(self, attempt: Attempt) -> None:
        self.common(attempt)
        refused = attempt.returncode == 2 and re.search(
            r"refused and rolled back|nothing to roll back|already deployed|has no canary|roll it back", attempt.output
        )
        self.tally.check(
            "a rerun completes (or is refused cleanly)",
            attempt.returncode == 0 or bool(refused),
            attempt.output[-1500:],
        )
        left = temp_leftovers(self.repo.root, self.repo.model_dir(MODEL))
        self.tally.check("no temporary file or directory is left after the rerun", not left, ", ".join(left[:5]))
        self.check_serving()


SCENARIOS = {
    s.name: s
    for s in (IngestScenario, TrainScenario, TrainNproc2Scenario, SweepScenario, ExportScenario, DeployScenario)
}
DEFAULT_KILLS = {"ingest": 90, "train": 24, "train_nproc2": 10, "sweep": 5, "export": 30, "deploy": 42}  # 201
QUICK_KILLS = {"ingest": 3, "train": 2, "train_nproc2": 1, "sweep": 1, "export": 2, "deploy": 3}
RERUN_EVERY = {"ingest": 2, "train": 3, "train_nproc2": 3, "sweep": 2, "export": 3, "deploy": 3}


def run_scenarios(
    names: list[str],
    kills: dict[str, int],
    work: Path,
    seed: int = 0,
    rows: int = 20_000,
    deploy_sources: list[Path] | None = None,
) -> list[Tally]:
    """Run each scenario's fault injections in ``work``; the tallies, in order."""
    shared = Shared(work / "shared", rows, deploy_sources)
    tallies = []
    for name in names:
        scenario = SCENARIOS[name](work / name, shared, random.Random(f"{seed}-{name}"))
        scenario.rerun_every = RERUN_EVERY[name]
        try:
            scenario.setup()
            tallies.append(scenario.inject(kills[name]))
        finally:
            if isinstance(scenario, DeployScenario) and hasattr(scenario, "server"):
                scenario.close()
    return tallies


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of the scenarios")
    parser.add_argument("--kills", type=int, default=0, help="faults per scenario (default: per-scenario counts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=20_000, help="synthetic rows of the datasets")
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)
    names = [n for n in args.scenarios.split(",") if n]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise RecopsError(f"faults: unknown scenario(s) {unknown}; choose from {sorted(SCENARIOS)}")
    kills = {n: args.kills or (QUICK_KILLS if args.quick else DEFAULT_KILLS)[n] for n in names}
    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="recops-faults-")))
        tallies = run_scenarios(names, kills, work, args.seed, 6000 if args.quick else args.rows)
    rows = [t.row() for t in tallies]
    violations = [v for t in tallies for v in t.violations]
    totals = {
        "faults": sum(r["faults"] for r in rows),
        "struck_while_running": sum(r["struck_while_running"] for r in rows),
        "invariants_checked": sum(r["invariants_checked"] for r in rows),
        "violations": len(violations),
        "seconds": round(time.monotonic() - start, 1),
    }
    path = write_result(
        NAME,
        rows,
        args.results_dir,
        plots=[{"x": "scenario", "y": "faults", "series": "scenario", "title": "faults injected per scenario"}],
        config={"kills": kills, "seed": args.seed, "rows": args.rows, "fault_weights": FAULT_WEIGHTS},
        command="python -m recops.bench.faults " + " ".join(argv if argv is not None else sys.argv[1:]),
        totals=totals,
        violation_details=violations[:200],
    )
    print(format_table(rows))
    print(json.dumps(totals))
    print(f"wrote {path}")
    return 1 if violations else 0


if __name__ == "__main__":
    run_main(main, NAME)
