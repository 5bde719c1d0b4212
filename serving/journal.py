"""Deployments as journaled transactions, and the hidden staging model that checks a candidate version.

A deployment change (``Deployer.deploy``, ``promote``, ``rollback``) touches three things: the model's version policy
in config.pbtxt, the versions the server has loaded, and the deployment record (``deploy_state.json``). Before the
first of them, the journal ``<repo>/<name>/.deploy-journal.json`` records the intent: the action, the committed record
it starts from and the version policy config.pbtxt had. Every later step is recorded before it is applied (a
checked version with the digest of its files, the policy about to be written); removing the journal commits.

A process killed in between leaves the journal. The next command that touches the deployment takes the deployment
lock (a dead writer holds no lock, so the journal is known to be abandoned) and restores the last committed state:
the staging model is unloaded and removed, config.pbtxt lists the committed versions again (the policy before the
deployment if none was committed), the server reloads and exactly those versions are checked to be ready, then the
record is written back with a ``recovered`` event and the journal removed. Recovery is idempotent: a recovery that is
itself cut short is redone by the next command.

A candidate is checked under a hidden staging name, ``.check-<name>`` (a config of its own and a symlink to the
version directory), never under the model's name: the model's policy only ever lists committed versions and
versions that passed their checks with the files they were checked with (:meth:`Journal.admit` refuses anything
else), so no request addressed to the model name can reach an unchecked version, before, during or after a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recops.errors import RecopsError
from recops.files import write_json_atomic
from recops.serving.repository import (
    CONFIG_FILE,
    ONNX_FILE,
    ModelConfig,
    ModelRepository,
    ServingOptions,
    VersionPolicy,
    model_config,
)
from recops.serving.server import TritonServer

JOURNAL_FILE = ".deploy-journal.json"
STAGING_PREFIX = ".check-"
SETTLE_S = 30.0  # how long a load/unload may take to show in the server's repository index


@dataclass(frozen=True)
class Transaction:
    """One deployment change in flight, as the journal records it."""

    action: str
    version: int | None
    before: dict[str, Any]  # the committed DeployState (to_dict) the change started from
    policy: dict[str, Any]  # the version policy config.pbtxt had (asdict of VersionPolicy)
    pid: int
    started: str
    step: str = "intent"
    checked: dict[str, str] = field(default_factory=dict)  # version -> digest of its files, once it passed
    policy_written: bool = False  # config.pbtxt was (about to be) rewritten: recovery rewrites it back

    @property
    def committed_versions(self) -> tuple[int, ...]:
        return tuple(v for v in (self.before.get("production"), self.before.get("canary")) if v is not None)

    def describe(self) -> str:
        target = f" of version {self.version}" if self.version is not None else ""
        return f"{self.action}{target} (pid {self.pid}, started {self.started}) stopped at step {self.step!r}"


def staging_name(name: str) -> str:
    """The hidden model name a candidate of ``name`` is checked under (Triton loads it, clients never ask for it)."""
    return f"{STAGING_PREFIX}{name}"


def version_digest(folder: Path) -> str:
    """sha256 over the relative paths and contents of every file in a version directory."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


class Journal:
    """The write-ahead journal of one model's deployment (use it under the deployment lock)."""

    def __init__(self, repo: ModelRepository, name: str):
        self.repo, self.name = repo, name
        self.path = repo.model_dir(name) / JOURNAL_FILE

    def read(self) -> Transaction | None:
        try:
            return Transaction(**json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise RecopsError(
                f"{self.path} is corrupt ({exc}); check `recops serve status`, then delete it and deploy again"
            ) from exc

    def _write(self, tx: Transaction) -> Transaction:
        write_json_atomic(self.path, asdict(tx), fsync=True)
        return tx

    def begin(self, action: str, version: int | None, before: dict[str, Any]) -> Transaction:
        """Record the intent before anything changes."""
        if self.read() is not None:
            raise RecopsError(f"{self.path}: a deployment is already in flight; recover it first")
        policy = asdict(self.repo.settings(self.name)[1].version_policy)
        started = datetime.now(UTC).isoformat(timespec="seconds")
        return self._write(Transaction(action, version, before, policy, os.getpid(), started))

    def step(self, step: str, **changes: Any) -> Transaction:
        """Record the next step (write-ahead: before it is applied)."""
        tx = self.read()
        if tx is None:
            raise RecopsError(f"{self.path}: no deployment in flight to record step {step!r} in")
        return self._write(replace(tx, step=step, **changes))

    def checked(self, version: int) -> Transaction:
        """``version`` passed its checks with the files it has now."""
        tx = self.read()
        digest = version_digest(self.repo.model_dir(self.name) / str(version))
        return self.step("checked", checked={**tx.checked, str(version): digest})

    def admit(self, versions: tuple[int, ...]) -> None:
        """Allow config.pbtxt to list ``versions``: each one committed, or checked in this transaction with
        unchanged files; recorded before the policy is written."""
        tx = self.read()
        for version in set(versions) - set(tx.committed_versions):
            digest = tx.checked.get(str(version))
            if digest is None or digest != version_digest(self.repo.model_dir(self.name) / str(version)):
                raise RecopsError(
                    f"version {version} of {self.name!r} has not passed its checks with its current files; "
                    "it cannot be served (deploy it again)"
                )
        self.step(f"serve {list(versions)}", policy_written=True)

    def commit(self) -> None:
        self.path.unlink(missing_ok=True)

    # ---- staging ---------------------------------------------------------------------------
    @property
    def staging_dir(self) -> Path:
        return self.repo.root / staging_name(self.name)

    def stage(self, version: int, config: ModelConfig) -> str:
        """A hidden model serving only ``version`` (its directory linked, not copied) under ``config``'s options;
        returns its name, to load and check."""
        self.step(f"check {version}")
        folder = self.staging_dir
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / CONFIG_FILE).write_text(replace(config, name=folder.name).to_pbtxt())
        os.symlink(Path("..") / self.name / str(version), folder / str(version))
        return folder.name

    def unstage(self, server: TritonServer | None) -> None:
        """Unload the staging model (if a server is given) and remove its directory."""
        if server is not None:
            unload(server, self.staging_dir.name)
        shutil.rmtree(self.staging_dir, ignore_errors=True)

    # ---- restoring -------------------------------------------------------------------------
    def restore(self, tx: Transaction, server: TritonServer | None) -> None:
        """config.pbtxt and the server back to the committed versions of ``tx`` (idempotent)."""
        self.unstage(server)
        if not tx.policy_written:
            return  # nothing but the staging model was touched
        versions = tuple(sorted(tx.committed_versions))
        policy = VersionPolicy("specific", versions=versions) if versions else VersionPolicy(**tx.policy)
        source = tx.before.get("production") if versions else tx.version
        write_policy(self.repo, self.name, policy, source)
        if server is not None and versions:
            load_exactly(server, self.name, versions)
        elif server is not None:
            unload(server, self.name)


def write_policy(
    repo: ModelRepository,
    name: str,
    policy: VersionPolicy,
    source: int,
    target: str | None = None,
    options: ServingOptions | None = None,
) -> None:
    """Rewrite ``name``'s config.pbtxt with ``policy`` (the signature of version ``source``; target and options default
    to the model's stored settings)."""
    stored_target, stored_options = repo.settings(name)
    options = replace(options or stored_options, version_policy=policy)
    onnx = repo.model_dir(name) / str(source) / ONNX_FILE
    repo.write_config(model_config(name, onnx, target or stored_target, options))


def load_exactly(server: TritonServer, name: str, versions: tuple[int, ...]) -> None:
    """(Re)load ``name`` (Triton loads the policy's versions and unloads the others), then wait until exactly
    ``versions`` are ready and nothing is loading or unloading."""
    server.load(name)
    if not _wait(lambda: loaded(server, name) == (set(versions), False)):
        ready, _ = loaded(server, name)
        raise RecopsError(f"{name!r}: versions {sorted(ready)} are ready after loading, expected {sorted(versions)}")


def unload(server: TritonServer, name: str) -> None:
    """Unload ``name`` if the server holds any of its versions, and wait until it holds none."""
    if loaded(server, name) == (set(), False):
        return
    server.unload(name)
    if not _wait(lambda: loaded(server, name) == (set(), False)):
        raise RecopsError(f"model {name!r} is still loaded on {server.http_url} after {SETTLE_S:.0f} s")


def loaded(server: TritonServer, name: str) -> tuple[set[int], bool]:
    """The ready versions of ``name`` on ``server``, and whether any version is loading or unloading."""
    entries = [m for m in server.models() if m["name"] == name and "version" in m]
    busy = any(m.get("state") in ("LOADING", "UNLOADING") for m in entries)
    return {int(m["version"]) for m in entries if m.get("state") == "READY"}, busy


def _wait(predicate, timeout_s: float = SETTLE_S, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True
