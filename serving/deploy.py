"""Deploy, canary, promote and roll back model versions on a running Triton server (explicit model control).

Which versions Triton serves is the model's ``version_policy: specific`` in config.pbtxt; loading the model
again makes Triton load the listed versions and unload the others (in-flight requests finish first; a
reload that fails leaves the previously loaded versions serving). The deployment record
``<repo>/<name>/deploy_state.json`` (atomic, under a file lock) says which loaded version is production,
which is the canary and its traffic share. ``route`` is the one split rule: inside Triton the raw-feature model's
preprocessing step (``recops.serving.raw_model``) applies it to every request, so every client gets the same split;
``Router`` applies it in a Python client of the tensor-level model.

A new version is loaded beside production, warmed up, and its server outputs are compared with local
ONNX Runtime on a probe batch (and, when the model has a raw-feature model, raw probe rows through it with its
own preprocessing); a version that fails to load, differs, or returns NaN is unloaded again and production keeps
serving. The raw-feature model is loaded once, with the first deployment: it follows the record by itself. A
production switch first points the split (both routers) at the new version, waits ``drain_s``, and only then
unloads the old one, so no request is sent to an unloaded version.

Run the server with ``--strict-readiness=false``: under strict readiness Triton answers /v2/health/ready
with 400 for good once any version failed to load (it keeps the failure record), and briefly during
every unload, so one refused deployment would take a healthy server out of a load balancer.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from recops.errors import RecopsError
from recops.files import write_json_atomic
from recops.serving.client import Predictor
from recops.serving.errors import ServingError
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


def deploy_lock(repo: ModelRepository, name: str) -> FileLock:
    """The lock serialising deployments (and repository writes) for one model."""
    folder = repo.model_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / LOCK_FILE))


def read_deploy_state(repo: ModelRepository, name: str) -> DeployState:
    path = state_path(repo, name)
    try:
        return DeployState.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return DeployState()
    except (ValueError, TypeError) as exc:
        raise RecopsError(f"{path} is corrupt ({exc}); fix or delete it, then deploy a version again") from exc


def served_policy(repo: ModelRepository, name: str) -> VersionPolicy | None:
    """The policy serving exactly the deployed versions, or None if nothing is deployed."""
    loaded = read_deploy_state(repo, name).loaded
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

    # ---- public actions -------------------------------------------------------------------
    def state(self) -> DeployState:
        return read_deploy_state(self.repo, self.name)

    def deploy(self, version: int, canary: float | None = None) -> DeployState:
        """Load ``version`` beside production, check it, then make it production or a canary with ``canary`` share."""
        with deploy_lock(self.repo, self.name):
            return self._deploy(version, canary)

    def promote(self) -> DeployState:
        """Make the canary production (and unload the old production)."""
        with deploy_lock(self.repo, self.name):
            state = self.state()
            if state.canary is None:
                raise DeployError(
                    f"model {self.name!r} has no canary to promote (production {state.production}); "
                    "deploy one with --canary first"
                )
            return self._switch(replace(state, canary=None, canary_share=0.0), state.canary, "promote")

    def rollback(self) -> DeployState:
        """Drop the canary; without one, bring the previous production version back (checked like a deploy)."""
        with deploy_lock(self.repo, self.name):
            state = self.state()
            if state.canary is None:
                if state.previous is None or state.previous not in self.repo.versions(self.name):
                    raise DeployError(
                        f"model {self.name!r}: nothing to roll back to (no canary, previous production "
                        f"{state.previous}); deploy a version explicitly"
                    )
                return self._deploy(state.previous, None)
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

    # ---- steps ----------------------------------------------------------------------------
    def _deploy(self, version: int, canary: float | None) -> DeployState:
        state = self._validate_deploy(self.state(), version, canary)
        try:
            self._check_signature(version, state.production)
        except RecopsError as exc:
            return self._reject(state, version, exc, restore=False)
        try:
            self._serve((*state.loaded, version), source=version)
            self._verify(version)
        except RecopsError as exc:
            return self._reject(state, version, exc)
        if canary is not None:
            message = f"version {version} takes {canary:.0%} of traffic beside production {state.production}"
            return self._write(
                state.event("canary", version, canary=version, canary_share=canary, status="canary", message=message)
            )
        return self._switch(state, version, "deploy")

    def _validate_deploy(self, state: DeployState, version: int, canary: float | None) -> DeployState:
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
        return state

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
        """Write config.pbtxt for exactly ``versions`` (signature of ``source``) and (re)load the model."""
        options = self._options(versions)
        self.repo.write_config(model_config(self.name, self._onnx(source), self.target, options))
        self.server.load(self.name)
        for version in versions:
            if not self.server.model_ready(self.name, version):
                raise DeployError(f"version {version} of {self.name!r} is not ready after loading")
        raw = raw_model_of(self.repo, self.name)
        if raw is not None and not self.server.model_ready(raw):  # loaded once: it follows the record by itself
            self.server.load(raw)

    def _verify(self, version: int) -> None:
        """Warm ``version`` up and compare its served outputs with local ONNX Runtime on a probe batch; likewise its
        raw-feature path (raw probe rows through the ensemble vs its preprocessing + ONNX Runtime) when the model has
        one."""
        record = ExportRecord.read(self._onnx(version).parent)
        rng = np.random.default_rng(self.config.seed)
        inputs = record.layout.random_inputs(self.config.probe_rows, rng) if record else self._zero_inputs(version)
        session = onnx_session(self._onnx(version), threads=1)
        with Predictor(self.server.http_url, self.name, timeout_s=self.config.timeout_s) as predictor:
            for _ in range(self.config.warmup_requests):
                predictor.predict_arrays(inputs, model_version=version)
            served = predictor.predict_arrays(inputs, model_version=version)
        tolerance = self.config.fp16_tolerance if self._fp16(record) else self.config.tolerance
        _compare(version, served, onnx_probabilities(session, inputs), tolerance, "served scores")
        raw = raw_model_of(self.repo, self.name)
        if raw is not None:
            self._verify_raw(raw, version, record, session, rng, tolerance)

    def _verify_raw(self, raw: str, version: int, record, session, rng: np.random.Generator, tolerance: float) -> None:
        if record is None:
            raise DeployError(
                f"version {version} has no export.json, so the raw-feature model {raw!r} cannot serve it; "
                "export it with `recops export`"
            )
        preprocessor = read_preprocessor(self._onnx(version).parent)
        frame = random_raw_frame(preprocessor.spec, self.config.probe_rows, rng)
        features = preprocessor.transform(frame)
        expected = onnx_probabilities(
            session, record.layout.features_inputs(features.dense, features.sparse, features.multi)
        )
        with Predictor(self.server.http_url, raw, timeout_s=self.config.timeout_s) as predictor:
            result = predictor.predict_rows(frame, version=version, separator=preprocessor.spec.separator)
        answered = set(result.row_versions.tolist())
        if answered != {version}:
            raise DeployError(f"raw-feature model {raw!r} answered with versions {sorted(answered)}, not {version}")
        _compare(version, result.scores, expected, tolerance, f"raw rows through {raw!r}")

    def _fp16(self, record: ExportRecord | None) -> bool:
        """Half precision: an FP16 export, or TensorRT in FP16 on the gpu target."""
        return bool(record and record.fp16) or (self.target == "gpu" and self.options.gpu.tensorrt == "FP16")

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

    def _reject(self, state: DeployState, version: int, exc: RecopsError, restore: bool = True) -> DeployState:
        """Serve exactly what ``state`` served again (if the server was touched), record the failure, raise."""
        restore_error = ""
        try:
            if restore and state.loaded:
                self._serve(state.loaded, source=state.production)
            elif restore:
                self.server.unload(self.name)
        except RecopsError as again:
            restore_error = f"; restoring the previous versions ALSO failed: {again}"
        message = (
            f"version {version} refused and rolled back: {exc}; production "
            f"{state.production if state.production is not None else '(none)'} keeps serving{restore_error}"
        )
        self._write(
            state.event(
                "rejected", version, status="rolled_back" if state.production is not None else "empty", message=message
            )
        )
        raise DeployError(message) from exc

    def _switch(self, state: DeployState, version: int, action: str) -> DeployState:
        """Point routers at ``version``, let requests to the old production drain, then unload it."""
        switched = self._write(
            state.event(
                action,
                version,
                production=version,
                previous=state.production,
                status="serving",
                message=f"version {version} is production",
            )
        )
        if state.production is not None:
            time.sleep(self.config.drain_s)
            self._serve(switched.loaded, source=version)
        return switched

    def _write(self, state: DeployState) -> DeployState:
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
