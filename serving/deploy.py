"""Deploy, canary, promote and roll back model versions on a running Triton server (explicit model control).

Which versions Triton serves is the model's ``version_policy: specific`` in config.pbtxt; loading the model
again makes Triton load the listed versions and unload the others (in-flight requests finish first; a
reload that fails leaves the previously loaded versions serving). The deployment record
``<repo>/<name>/deploy_state.json`` (atomic, under a file lock) says which loaded version is production,
which is the canary and its traffic share. ``route`` is the one split rule: inside Triton the raw-feature model's
preprocessing step (``recops.serving.raw_model``) applies it to every request, so every client gets the same split;
``Router`` applies it in a Python client of the tensor-level model.

A new version is first loaded under a hidden staging name, warmed up, and its server outputs are compared with
local ONNX Runtime on a probe batch; a version that fails to load, differs, or returns NaN is refused there and
never listed under the model's name. When the model has a raw-feature model, raw probe rows then go through it to
the new version (now listed, not yet routed to) and are compared with its own preprocessing + ONNX Runtime; the
raw-feature model is loaded once, with the first deployment: it follows the record by itself. Every change is a
journaled transaction (``recops.serving.journal``): a deployment cut short by a crash is brought back to its last
committed state by the next command touching it (``recover_deployment``). A production switch first points the
split (both routers) at the new version, waits ``drain_s``, and only then unloads the old one, so no request is
sent to an unloaded version.

Run the server with ``--strict-readiness=false``: under strict readiness Triton answers /v2/health/ready
with 400 for good once any version failed to load (it keeps the failure record), and briefly during
every unload, so one refused deployment would take a healthy server out of a load balancer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from recops.errors import RecopsError
from recops.files import write_json_atomic
from recops.serving.client import Predictor
from recops.serving.errors import ServingError
from recops.serving.journal import JOURNAL_FILE, Journal, load_exactly, write_policy
from recops.serving.onnx_model import ExportRecord, onnx_probabilities, onnx_session, read_preprocessor
from recops.serving.raw_features import random_raw_frame, raw_model_of
from recops.serving.repository import (
    ONNX_FILE,
    ModelRepository,
    ServingOptions,
    VersionPolicy,
    model_config,
    read_signature,
)
from recops.serving.server import TritonServer

STATE_FILE = "deploy_state.json"
LOCK_FILE = ".deploy.lock"
HISTORY_LIMIT = 100


class DeployError(RecopsError):
    """A deployment step failed; the message says what and which version production serves now."""


@dataclass(frozen=True)
class DeployConfig:
    """How deployments check and switch versions.

    ``target`` and ``options`` None = the model's settings in the repository (``ModelRepository.settings``:
    what the export or the last deployment wrote); the version policy is always the deployment's own.
    """

    target: str | None = None
    options: ServingOptions | None = None
    probe_rows: int = 64
    warmup_requests: int = 2
    tolerance: float = 1e-5
    fp16_tolerance: float = 1e-2
    drain_s: float = 1.0
    timeout_s: float = 30.0
    seed: int = 0


@dataclass(frozen=True)
class DeployState:
    """The deployment record of one model."""

    production: int | None = None
    canary: int | None = None
    canary_share: float = 0.0
    previous: int | None = None  # the production version before the last switch (rollback target)
    status: str = "empty"  # empty | serving | canary | rolled_back
    message: str = ""
    history: tuple[dict[str, Any], ...] = ()

    @property
    def loaded(self) -> tuple[int, ...]:
        return tuple(v for v in (self.production, self.canary) if v is not None)

    def event(self, action: str, version: int | None, **changes: Any) -> DeployState:
        """This state with ``changes`` applied and ``action`` appended to the history."""
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "action": action,
            "version": version,
            "message": changes.get("message", ""),
        }
        return replace(self, **changes, history=(*self.history, entry)[-HISTORY_LIMIT:])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "history": list(self.history)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeployState:
        return cls(**{**data, "history": tuple(data.get("history", ()))})

    def summary(self) -> dict[str, Any]:
        return {
            "production_version": self.production,
            "canary_version": self.canary,
            "canary_share": self.canary_share,
            "previous_version": self.previous,
            "status": self.status,
            "message": self.message,
        }


def state_path(repo: ModelRepository, name: str) -> Path:
    return repo.model_dir(name) / STATE_FILE


def deploy_lock(repo: ModelRepository, name: str, timeout: float = -1) -> FileLock:
    """The lock serialising deployments (and repository writes) for one model (``timeout`` -1: wait)."""
    folder = repo.model_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / LOCK_FILE), timeout=timeout)


def read_deploy_state(repo: ModelRepository, name: str) -> DeployState:
    path = state_path(repo, name)
    try:
        return DeployState.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return DeployState()
    except (ValueError, TypeError) as exc:
        raise RecopsError(f"{path} is corrupt ({exc}); fix or delete it, then deploy a version again") from exc


def committed_state(repo: ModelRepository, name: str) -> DeployState:
    """The last committed deployment record: the record a deployment in flight (or cut short) started from."""
    tx = Journal(repo, name).read()
    return DeployState.from_dict(tx.before) if tx is not None else read_deploy_state(repo, name)


def recover_deployment(
    repo: ModelRepository, name: str, server: TritonServer | str | None, wait: bool = True
) -> DeployState | None:
    """Bring a deployment cut short by a crash back to its last committed state: on ``server`` (a handle or an HTTP
    URL: reload, verify) and in the repository, or in the repository only when no server runs. Returns the restored
    record, or None if nothing was in flight; with ``wait`` False, also None while a live deployment holds the lock
    (it keeps the invariants itself)."""
    if not Journal(repo, name).path.is_file():
        return None
    if isinstance(server, str):
        server = TritonServer.attach(server)
    try:
        with deploy_lock(repo, name, timeout=-1 if wait else 0):
            return _recover(repo, name, server)
    except Timeout:
        return None


def recover_repository(repo: ModelRepository, server: TritonServer | str | None = None) -> list[str]:
    """Recover every model of ``repo`` with a deployment cut short; returns their names."""
    names = [p.parent.name for p in sorted(repo.root.glob(f"*/{JOURNAL_FILE}"))]
    return [name for name in names if recover_deployment(repo, name, server, wait=False) is not None]


def _recover(
    repo: ModelRepository, name: str, server: TritonServer | None, action: str = "recovered", **changes: Any
) -> DeployState | None:
    """Under the lock: restore the committed state of the transaction in flight, record ``action`` and commit (None:
    nothing in flight)."""
    journal = Journal(repo, name)
    tx = journal.read()
    if tx is None:
        return None
    journal.restore(tx, server)
    before = DeployState.from_dict(tx.before)
    changes.setdefault("message", f"{tx.describe()}; restored: {before.message or before.status}")
    state = before.event(action, tx.version, **changes)
    write_json_atomic(state_path(repo, name), state.to_dict())
    journal.commit()
    return state


def served_policy(repo: ModelRepository, name: str) -> VersionPolicy | None:
    """The policy serving exactly the deployed versions, or None if nothing is deployed."""
    loaded = committed_state(repo, name).loaded
    return VersionPolicy("specific", versions=tuple(sorted(loaded))) if loaded else None


def in_canary(key: str, share: float) -> bool:
    """Deterministic traffic split: the first 8 bytes of sha256(key) as a fraction in [0, 1) < ``share``."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64 < share


def route(state: DeployState, key: str) -> tuple[int, str]:
    """(version, "production" | "canary") that ``key`` goes to: the one split rule, used by ``Router`` in clients and
    by the raw-feature model's preprocessing step inside Triton (``recops.serving.raw_model``)."""
    if state.canary is not None and in_canary(key, state.canary_share):
        return state.canary, "canary"
    if state.production is None:
        raise ServingError("no production version deployed; deploy one with `recops deploy`")
    return state.production, "production"


class DeployRecord:
    """One model's deployment record as a reader sees it: re-read only when its file changes."""

    def __init__(self, repo: ModelRepository, name: str):
        self.repo, self.name = repo, name
        self._state, self._stamp = DeployState(), None

    def exists(self) -> bool:
        return state_path(self.repo, self.name).is_file()

    def state(self) -> DeployState:
        """The current record (an empty ``DeployState`` when there is none)."""
        try:
            info = os.stat(state_path(self.repo, self.name))
        except FileNotFoundError:
            self._state, self._stamp = DeployState(), None
            return self._state
        stamp = (info.st_ino, info.st_mtime_ns)
        if stamp != self._stamp:
            self._state, self._stamp = read_deploy_state(self.repo, self.name), stamp
        return self._state


class Deployer:
    """Moves one model's versions in and out of production on a running server."""

    def __init__(
        self,
        server: TritonServer | str,
        repo: ModelRepository | Path | str,
        name: str,
        config: DeployConfig = DeployConfig(),
    ):
        self.server = server if isinstance(server, TritonServer) else TritonServer.attach(server)
        self.repo = repo if isinstance(repo, ModelRepository) else ModelRepository(repo)
        self.name, self.config = name, config
        if not self.repo.versions(name):
            raise RecopsError(f"model {name!r} has no version in {self.repo.root}; export one with `recops export`")
        stored_target, stored_options = self.repo.settings(name)
        self.target, self.options = config.target or stored_target, config.options or stored_options
        self.journal = Journal(self.repo, name)

    # ---- public actions -------------------------------------------------------------------
    def state(self) -> DeployState:
        """The last committed deployment record."""
        return committed_state(self.repo, self.name)

    def recover(self) -> DeployState | None:
        """Bring a deployment cut short by a crash back to its last committed state (None: nothing to recover)."""
        return recover_deployment(self.repo, self.name, self.server)

    def deploy(self, version: int, canary: float | None = None) -> DeployState:
        """Check ``version`` under the staging name, then serve it beside production and make it production or a
        canary with ``canary`` share."""
        with self._locked() as state, self._transaction("canary" if canary is not None else "deploy", version, state):
            return self._deploy(state, version, canary)

    def promote(self) -> DeployState:
        """Make the canary production (and unload the old production)."""
        with self._locked() as state:
            if state.canary is None:
                raise DeployError(
                    f"model {self.name!r} has no canary to promote (production {state.production}); "
                    "deploy one with --canary first"
                )
            with self._transaction("promote", state.canary, state):
                return self._switch(replace(state, canary=None, canary_share=0.0), state.canary, "promote")

    def rollback(self) -> DeployState:
        """Drop the canary; without one, bring the previous production version back (checked like a deploy). A
        rollback right after a rollback has nothing to roll back."""
        with self._locked() as state:
            if state.canary is not None:
                with self._transaction("rollback", state.canary, state):
                    return self._drop_canary(state)
            problem = self._nothing_to_roll_back(state)
            if problem:
                raise DeployError(f"model {self.name!r}: nothing to roll back ({problem}); deploy a version explicitly")
            with self._transaction("rollback", state.previous, state):
                return self._deploy(state, state.previous, None, action="rollback")

    def _nothing_to_roll_back(self, state: DeployState) -> str | None:
        """Why a rollback without a canary cannot bring a previous version back (None: it can)."""
        if state.history and state.history[-1]["action"] == "rollback":
            return f"version {state.history[-1]['version']} was just rolled back; production {state.production}"
        if state.previous is None or state.previous not in self.repo.versions(self.name):
            return f"no canary and no previous production version in the repository (previous {state.previous})"
        return None

    # ---- transactions ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[DeployState]:
        """Hold the deployment lock; a deployment cut short before is recovered first. Yields the committed record."""
        with deploy_lock(self.repo, self.name):
            yield _recover(self.repo, self.name, self.server) or read_deploy_state(self.repo, self.name)

    @contextlib.contextmanager
    def _transaction(self, action: str, version: int | None, state: DeployState) -> Iterator[None]:
        """Journal the change: intent before the block, commit after it; a block that fails without restoring
        (an unexpected error, Ctrl-C) is recovered at once, or by the next command if that fails too."""
        self.journal.begin(action, version, state.to_dict())
        try:
            yield
        except BaseException:
            with contextlib.suppress(RecopsError):
                _recover(self.repo, self.name, self.server)
            raise
        self.journal.commit()

    # ---- steps ----------------------------------------------------------------------------
    def _deploy(self, state: DeployState, version: int, canary: float | None, action: str = "deploy") -> DeployState:
        self._validate_deploy(state, version, canary)
        try:
            self._check_signature(version, state.production)
            self._check(version)
            self._serve((*state.loaded, version), source=version)
            self._verify_raw(version)
        except RecopsError as exc:
            self._reject(state, version, exc)
        if canary is not None:
            message = f"version {version} takes {canary:.0%} of traffic beside production {state.production}"
            return self._write(
                state.event("canary", version, canary=version, canary_share=canary, status="canary", message=message)
            )
        return self._switch(state, version, action)

    def _validate_deploy(self, state: DeployState, version: int, canary: float | None) -> None:
        if version not in self.repo.versions(self.name):
            raise DeployError(
                f"model {self.name!r} has no version {version} in {self.repo.root} "
                f"(have {self.repo.versions(self.name)}); export it first"
            )
        if version in state.loaded:
            raise DeployError(
                f"version {version} of {self.name!r} is already deployed ({state.status}); use --promote or --rollback"
            )
        if state.canary is not None:
            raise DeployError(
                f"model {self.name!r} has canary {state.canary} running: promote or roll it back "
                "before deploying another version"
            )
        if canary is not None and not 0.0 < canary < 1.0:
            raise DeployError(f"canary share {canary} must be between 0 and 1 (e.g. 0.1)")
        if canary is not None and state.production is None:
            raise DeployError(
                f"model {self.name!r} has no production version to run a canary beside; "
                "deploy one without --canary first"
            )

    def _onnx(self, version: int) -> Path:
        return self.repo.model_dir(self.name) / str(version) / ONNX_FILE

    def _options(self, versions: tuple[int, ...]) -> ServingOptions:
        return replace(self.options, version_policy=VersionPolicy("specific", versions=tuple(sorted(set(versions)))))

    def _check_signature(self, version: int, production: int | None) -> None:
        try:
            signature = read_signature(self._onnx(version))
        except RecopsError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnx raises protobuf/IO errors for unreadable files
            raise DeployError(f"version {version}: {self._onnx(version)} is not a readable ONNX model ({exc})") from exc
        if production is not None and signature != read_signature(self._onnx(production)):
            raise DeployError(
                f"version {version} has other inputs/outputs than production {production}; "
                "serve it under a new model name"
            )

    def _serve(self, versions: tuple[int, ...], source: int) -> None:
        """Write config.pbtxt for exactly ``versions`` (signature of ``source``; each one committed or checked) and
        (re)load the model until exactly they are ready; the raw-feature model is loaded with the first deployment."""
        versions = tuple(sorted(set(versions)))
        self.journal.admit(versions)
        policy = VersionPolicy("specific", versions=versions)
        write_policy(self.repo, self.name, policy, source, self.target, self.options)
        load_exactly(self.server, self.name, versions)
        raw = raw_model_of(self.repo, self.name)
        if raw is not None and not self.server.model_ready(raw):  # loaded once: it follows the record by itself
            self.server.load(raw)

    def _check(self, version: int) -> None:
        """Score a probe batch with local ONNX Runtime (an unreadable or non-finite version is refused before the
        server sees it), then load ``version`` alone under the staging name (no warm-up: a failing load whose client
        died can crash Triton 2.51), compare its served scores, unload it; journal it as checked."""
        inputs, expected = self._local_probe(version)
        options = replace(self._options((version,)), warmup=())
        staged = self.journal.stage(version, model_config(self.name, self._onnx(version), self.target, options))
        try:
            self.server.load(staged)
            if not self.server.model_ready(staged, version):
                raise DeployError(f"version {version} of {self.name!r} is not ready after loading")
            self._verify(version, staged, inputs, expected)
        finally:
            self.journal.unstage(self.server)
        self.journal.checked(version)

    def _local_probe(self, version: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The probe batch and its scores from local ONNX Runtime; DeployError if it cannot run it or they are not
        all finite."""
        record = ExportRecord.read(self._onnx(version).parent)
        rng = np.random.default_rng(self.config.seed)
        inputs = record.layout.random_inputs(self.config.probe_rows, rng) if record else self._zero_inputs(version)
        try:
            expected = onnx_probabilities(onnx_session(self._onnx(version), threads=1), inputs)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own error types for bad models
            raise DeployError(f"version {version}: ONNX Runtime cannot run {self._onnx(version)} ({exc})") from exc
        bad = int((~np.isfinite(expected)).sum())
        if bad:
            raise DeployError(
                f"version {version} returns {bad} non-finite (NaN/inf) scores of {expected.size} on the probe batch "
                "in ONNX Runtime"
            )
        return inputs, expected

    def _verify(self, version: int, model: str, inputs: dict[str, np.ndarray], expected: np.ndarray) -> None:
        """Warm ``model`` version ``version`` up and compare its served scores with ``expected``."""
        record = ExportRecord.read(self._onnx(version).parent)
        with Predictor(self.server.http_url, model, timeout_s=self.config.timeout_s) as predictor:
            for _ in range(self.config.warmup_requests):
                predictor.predict_arrays(inputs, model_version=version)
            served = predictor.predict_arrays(inputs, model_version=version)
        _compare(version, served, expected, self._tolerance(record), "served scores")

    def _verify_raw(self, version: int) -> None:
        """When the model has a raw-feature model: raw probe rows through it to ``version`` (listed under the model's
        name, not yet routed to) vs the version's own preprocessing + local ONNX Runtime."""
        raw = raw_model_of(self.repo, self.name)
        if raw is None:
            return
        record = ExportRecord.read(self._onnx(version).parent)
        if record is None:
            raise DeployError(
                f"version {version} has no export.json, so the raw-feature model {raw!r} cannot serve it; "
                "export it with `recops export`"
            )
        preprocessor = read_preprocessor(self._onnx(version).parent)
        frame = random_raw_frame(preprocessor.spec, self.config.probe_rows, np.random.default_rng(self.config.seed))
        features = preprocessor.transform(frame)
        expected = onnx_probabilities(
            onnx_session(self._onnx(version), threads=1),
            record.layout.features_inputs(features.dense, features.sparse, features.multi),
        )
        with Predictor(self.server.http_url, raw, timeout_s=self.config.timeout_s) as predictor:
            result = predictor.predict_rows(frame, version=version, separator=preprocessor.spec.separator)
        answered = set(result.row_versions.tolist())
        if answered != {version}:
            raise DeployError(f"raw-feature model {raw!r} answered with versions {sorted(answered)}, not {version}")
        _compare(version, result.scores, expected, self._tolerance(record), f"raw rows through {raw!r}")

    def _tolerance(self, record: ExportRecord | None) -> float:
        """The half-precision tolerance for an FP16 export or TensorRT in FP16 on the gpu target, else the default."""
        fp16 = bool(record and record.fp16) or (self.target == "gpu" and self.options.gpu.tensorrt == "FP16")
        return self.config.fp16_tolerance if fp16 else self.config.tolerance

    def _zero_inputs(self, version: int) -> dict[str, np.ndarray]:
        """Probe inputs for a version without export.json: random floats, id 0 (always a valid row)."""
        inputs, _, _ = read_signature(self._onnx(version))
        rng = np.random.default_rng(self.config.seed)
        rows = self.config.probe_rows
        return {
            s.name: rng.random((rows, *s.dims[1:]), dtype=np.float32)
            if s.dtype == "FP32"
            else np.zeros((rows, *s.dims[1:]), np.int64)
            for s in inputs
        }

    def _reject(self, state: DeployState, version: int, exc: RecopsError) -> None:
        """Restore what ``state`` served (the journal's committed state), record the refusal, raise."""
        production = state.production if state.production is not None else "(none)"
        message = f"version {version} refused and rolled back: {exc}; production {production} keeps serving"
        status = "rolled_back" if state.production is not None else "empty"
        try:
            _recover(self.repo, self.name, self.server, "rejected", status=status, message=message)
        except RecopsError as again:
            raise DeployError(
                f"{message}; restoring the previous versions ALSO failed: {again} (the next command touching "
                f"{self.name!r} retries)"
            ) from exc
        raise DeployError(message) from exc

    def _switch(self, state: DeployState, version: int, action: str) -> DeployState:
        """Point routers at ``version``, let requests to the old production drain, then unload it. After a rollback
        there is no previous version to go back to."""
        switched = self._write(
            state.event(
                action,
                version,
                production=version,
                previous=state.production if action != "rollback" else None,
                status="serving",
                message=f"version {version} is production",
            )
        )
        if state.production is not None:
            time.sleep(self.config.drain_s)
            self._serve(switched.loaded, source=version)
        return switched

    def _drop_canary(self, state: DeployState) -> DeployState:
        """Point routers back at production alone, let canary requests drain, then unload the canary."""
        dropped = self._write(
            state.event(
                "rollback",
                state.canary,
                canary=None,
                canary_share=0.0,
                status="serving",
                message=f"canary {state.canary} rolled back; production {state.production}",
            )
        )
        time.sleep(self.config.drain_s)
        self._serve(dropped.loaded, source=dropped.production)
        return dropped

    def _write(self, state: DeployState) -> DeployState:
        self.journal.step(f"record {state.history[-1]['action']}")
        write_json_atomic(state_path(self.repo, self.name), state.to_dict())
        return state


def _compare(version: int, served: np.ndarray, expected: np.ndarray, tolerance: float, what: str) -> None:
    """Raise DeployError when ``served`` has non-finite scores or differs from ``expected`` beyond ``tolerance``."""
    bad = int((~np.isfinite(served)).sum())
    if bad:
        raise DeployError(
            f"version {version} returned {bad} non-finite (NaN/inf) scores of {served.size} on the probe batch"
        )
    diff = float(np.abs(served.astype(np.float64) - expected).max())
    if not diff <= tolerance:
        raise DeployError(
            f"version {version}: {what} differ from local ONNX Runtime by {diff:.3g} "
            f"(tolerance {tolerance:g}) on the probe batch"
        )


@dataclass(frozen=True)
class RoutedPrediction:
    scores: np.ndarray
    version: int
    arm: str  # "production" or "canary"


class Router:
    """Sends each request to the production or canary version by its key, following the deployment record.

    The record is re-read whenever its file changes. A request that fails because its version was just
    unloaded is retried once on the version the (re-read) record routes to. Not thread-safe: one per thread.
    """

    def __init__(
        self, url: str, repo: ModelRepository | Path | str, name: str, protocol: str = "http", timeout_s: float = 10.0
    ):
        self.repo = repo if isinstance(repo, ModelRepository) else ModelRepository(repo)
        self.name = name
        self.predictor = Predictor(url, name, protocol=protocol, timeout_s=timeout_s)
        self.record = DeployRecord(self.repo, name)

    def state(self) -> DeployState:
        if not self.record.exists():
            raise ServingError(
                f"model {self.name!r} has no deployment in {self.repo.root}; deploy a version with `recops deploy`"
            )
        return self.record.state()

    def route(self, key: str) -> tuple[int, str]:
        """(version, "production" | "canary") for ``key``."""
        try:
            return route(self.state(), key)
        except ServingError as exc:
            raise ServingError(f"model {self.name!r}: {exc}") from None

    def predict(self, inputs: dict[str, np.ndarray], key: str) -> RoutedPrediction:
        """Score ``inputs`` on the version ``key`` routes to; ``version`` is the one the server answered with."""
        chosen = self.route(key)
        try:
            return self._predict(inputs, *chosen)
        except ServingError:
            retry = self.route(key)
            if retry == chosen:
                raise
            return self._predict(inputs, *retry)

    def _predict(self, inputs: dict[str, np.ndarray], version: int, arm: str) -> RoutedPrediction:
        result = self.predictor.predict(inputs, model_version=version)
        if len(result.outputs) != 1:
            raise ServingError(f"model {self.name!r} has outputs {sorted(result.outputs)}; a router expects one score")
        return RoutedPrediction(next(iter(result.outputs.values())), int(result.model_versions[0]), arm)

    def close(self) -> None:
        self.predictor.close()

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
