"""Model registry: versioned checkpoints with metrics, lineage and moving aliases.

``ModelRegistry`` is the contract (small enough for an MLflow backend to implement);
``LocalRegistry`` keeps everything under one directory::

    <root>/index.json             next version, registered versions, aliases, alias history, checkpoint
                                  fingerprints, and where each version is served (export and deploy record it)
    <root>/versions/<n>/meta.json  the immutable record of version n (metrics, params, dataset root + version,
                                  checkpoint fingerprint, lineage)
    <root>/versions/<n>/checkpoint/ a copy of the registered checkpoint directory
    <root>/.lock                  filelock serialising version allocation and index updates

Checkpoints are copied into a hidden temporary directory first and renamed into place, and every
JSON file is written to a temporary file and ``os.replace``-d, so readers never see partial state
and concurrent registrations from several processes get distinct versions.
"""

from __future__ import annotations

import abc
import getpass
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock

from recops.errors import RecopsError
from recops.files import remove_stale, staging_dir, write_json_atomic
from recops.settings import settings
from recops.training.dataset import DatasetRef
from recops.training.environment import CodeVersion

ALIAS_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,63}")
INDEX_FORMAT = 1


@dataclass(frozen=True)
class Lineage:
    """Where a model version came from."""

    sweep_id: str | None = None
    trial_id: str | None = None
    parent_version: int | None = None  # the version it was warm-started from
    code: CodeVersion = field(default_factory=CodeVersion)
    libraries: dict[str, str] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Lineage:
        return cls(**{**data, "code": CodeVersion(**data.get("code", {}))})


@dataclass(frozen=True)
class ModelVersion:
    """One registered model, trained on ``dataset``. ``fingerprint`` identifies its checkpoint's content (see
    ``Checkpoint.fingerprint``). ``aliases`` point at it and ``served`` says where it is exported and deployed
    (``{repository, model, version, status}``), as of reading."""

    version: int
    created: str  # ISO 8601, UTC
    checkpoint: Path  # inside the registry
    metrics: dict[str, float]
    params: dict[str, Any]
    dataset: DatasetRef
    lineage: Lineage
    fingerprint: str | None = None
    aliases: list[str] = field(default_factory=list)
    served: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "checkpoint": str(self.checkpoint), "dataset": self.dataset.to_dict()}


@dataclass(frozen=True)
class AliasEvent:
    """One alias move: ``alias`` left ``from_version`` (None if new) for ``to_version``."""

    alias: str
    from_version: int | None
    to_version: int
    user: str
    time: str  # ISO 8601, UTC
    reason: str = ""


class ModelRegistry(abc.ABC):
    """Stores model versions and the aliases (``candidate``, ``production``, ...) pointing at them."""

    @abc.abstractmethod
    def register(
        self,
        checkpoint_dir: Path,
        metrics: dict[str, float],
        params: dict[str, Any],
        dataset: DatasetRef,
        lineage: Lineage | None = None,
        fingerprint: str | None = None,
    ) -> ModelVersion:
        """Copy ``checkpoint_dir`` into the registry as the next version and return it."""

    @abc.abstractmethod
    def get(self, version: int) -> ModelVersion:
        """The given version; RecopsError if unknown."""

    @abc.abstractmethod
    def find(self, fingerprint: str) -> ModelVersion | None:
        """The first version registered with this checkpoint fingerprint, or None."""

    @abc.abstractmethod
    def record_served(self, version: int, repository: str, model: str, served_version: int, status: str) -> None:
        """Record (or update) that ``version`` is served as ``model``/``served_version`` in ``repository``."""

    def resolve(self, ref: int | str) -> ModelVersion:
        """A version by number (``3``, ``"3"``) or alias (``"production"``)."""
        if isinstance(ref, int) or str(ref).isdigit():
            return self.get(int(ref))
        return self.get_by_alias(str(ref))

    @abc.abstractmethod
    def get_by_alias(self, name: str) -> ModelVersion:
        """The version ``name`` points at; RecopsError if no such alias."""

    @abc.abstractmethod
    def list(self) -> list[ModelVersion]:
        """All readable versions, oldest first."""

    @abc.abstractmethod
    def set_alias(self, version: int, name: str, reason: str = "", user: str | None = None) -> AliasEvent | None:
        """Point ``name`` at ``version`` (moving it off any other); None if it already pointed there."""

    @abc.abstractmethod
    def alias_history(self, name: str | None = None) -> list[AliasEvent]:
        """Every alias move, oldest first, optionally for one alias."""


def validate_alias(name: str) -> str:
    if not isinstance(name, str) or not ALIAS_PATTERN.fullmatch(name):
        raise RecopsError(
            f"invalid alias {name!r}: use a lowercase name matching [a-z][a-z0-9_-]* "
            "(at most 64 characters), e.g. candidate, production, archived"
        )
    return name


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _json_payload(what: str, value: dict[str, Any]) -> dict[str, Any]:
    """Check ``value`` is a JSON-serialisable dict with string keys, before anything is written."""
    if not isinstance(value, dict):
        raise RecopsError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise RecopsError(f"{what} must be JSON-serialisable (numbers, strings, lists, dicts): {exc}") from exc


class LocalRegistry(ModelRegistry):
    """A registry in a local (or shared-filesystem) directory; safe across processes."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else settings().registry

    @property
    def _index_path(self) -> Path:
        return self.root / "index.json"

    @property
    def _versions_dir(self) -> Path:
        return self.root / "versions"

    def _lock(self) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".lock"), timeout=120)

    def _read_index(self) -> dict[str, Any]:
        if not self._index_path.exists():
            return {
                "format": INDEX_FORMAT,
                "next_version": 1,
                "versions": [],
                "aliases": {},
                "alias_history": [],
                "fingerprints": {},
                "served": {},
            }
        try:
            index = json.loads(self._index_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RecopsError(
                f"cannot read registry index {self._index_path}: {exc}; restore it from a backup"
            ) from exc
        if index.get("format") != INDEX_FORMAT:
            raise RecopsError(
                f"registry index {self._index_path} has format {index.get('format')!r}, "
                f"expected {INDEX_FORMAT}: use a recops version that wrote it"
            )
        index.setdefault("fingerprints", {})
        index.setdefault("served", {})
        return index

    def register(
        self,
        checkpoint_dir: Path,
        metrics: dict[str, float],
        params: dict[str, Any],
        dataset: DatasetRef,
        lineage: Lineage | None = None,
        fingerprint: str | None = None,
    ) -> ModelVersion:
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise RecopsError(
                f"checkpoint directory {checkpoint_dir} does not exist or is not a directory: "
                "pass the directory the training run saved its checkpoint to"
            )
        if not isinstance(dataset, DatasetRef) or not dataset.version:
            raise RecopsError(
                f"dataset {dataset!r}: pass the processed dataset (root and version) the model was trained on"
            )
        lineage = lineage or Lineage()
        record = {
            "metrics": _json_payload("metrics", metrics),
            "params": _json_payload("params", params),
            "dataset": dataset.to_dict(),
            "fingerprint": fingerprint,
            "lineage": _json_payload("lineage", asdict(lineage)),
        }
        if lineage.parent_version is not None:
            self.get(lineage.parent_version)
        self._versions_dir.mkdir(parents=True, exist_ok=True)
        remove_stale(self._versions_dir)
        with staging_dir(self._versions_dir / "version") as staging:
            shutil.copytree(checkpoint_dir, staging / "checkpoint")
            with self._lock():
                index = self._read_index()
                version = self._next_version(index)
                record.update(version=version, created=_now(), checkpoint="checkpoint")
                write_json_atomic(staging / "meta.json", record, fsync=True)
                os.rename(staging, self._versions_dir / str(version))
                index["next_version"] = version + 1
                index["versions"].append(version)
                if fingerprint:
                    index["fingerprints"].setdefault(fingerprint, version)
                write_json_atomic(self._index_path, index, fsync=True)
        return self.get(version)

    def _next_version(self, index: dict[str, Any]) -> int:
        """The index's counter, skipped past any version directory a crashed registration left behind."""
        on_disk = [int(p.name) for p in self._versions_dir.iterdir() if p.name.isdigit()]
        return max([index["next_version"], *(v + 1 for v in on_disk)])

    def get(self, version: int) -> ModelVersion:
        return self._load(version, self._read_index())

    def _load(self, version: int, index: dict[str, Any]) -> ModelVersion:
        if version not in index["versions"]:
            known = ", ".join(map(str, index["versions"])) or "none"
            raise RecopsError(f"unknown model version {version!r} in registry {self.root} (registered: {known})")
        version_dir = self._versions_dir / str(version)
        try:
            meta = json.loads((version_dir / "meta.json").read_text())
            dataset = meta.get("dataset") or {"root": "", "version": meta["dataset_version"]}  # older records
            return ModelVersion(
                version=meta["version"],
                created=meta["created"],
                checkpoint=(version_dir / meta["checkpoint"]).resolve(),
                metrics=meta["metrics"],
                params=meta["params"],
                dataset=DatasetRef.from_dict(dataset),
                lineage=Lineage.from_dict(meta["lineage"]),
                fingerprint=meta.get("fingerprint"),
                aliases=sorted(name for name, v in index["aliases"].items() if v == version),
                served=list(index["served"].get(str(version), [])),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RecopsError(
                f"registry {self.root}: version {version}'s record {version_dir / 'meta.json'} is "
                f"unreadable ({type(exc).__name__}: {exc}); restore it from a backup"
            ) from exc

    def get_by_alias(self, name: str) -> ModelVersion:
        index = self._read_index()
        validate_alias(name)
        if name not in index["aliases"]:
            known = ", ".join(sorted(index["aliases"])) or "none"
            raise RecopsError(
                f"no model has alias {name!r} in registry {self.root} (aliases: {known}); "
                f"set it with `recops models alias VERSION {name}`"
            )
        return self._load(index["aliases"][name], index)

    def list(self) -> list[ModelVersion]:
        """Every readable version (see :meth:`broken` for the others), oldest first."""
        index = self._read_index()
        return [self._load(v, index) for v in index["versions"] if v not in self._broken(index)]

    def broken(self) -> dict[int, str]:
        """Versions whose record cannot be read, with the reason."""
        return self._broken(self._read_index())

    def _broken(self, index: dict[str, Any]) -> dict[int, str]:
        problems = {}
        for version in index["versions"]:
            try:
                self._load(version, index)
            except RecopsError as exc:
                problems[version] = str(exc)
        return problems

    def find(self, fingerprint: str) -> ModelVersion | None:
        index = self._read_index()
        version = index["fingerprints"].get(fingerprint)
        return self._load(version, index) if version is not None else None

    def record_served(self, version: int, repository: str, model: str, served_version: int, status: str) -> None:
        with self._lock():
            index = self._read_index()
            self._load(version, index)
            entries = [
                e
                for e in index["served"].get(str(version), [])
                if (e["repository"], e["model"], e["version"]) != (repository, model, served_version)
            ]
            entries.append(
                {"repository": repository, "model": model, "version": served_version, "status": status, "time": _now()}
            )
            index["served"][str(version)] = entries
            write_json_atomic(self._index_path, index, fsync=True)

    def set_alias(self, version: int, name: str, reason: str = "", user: str | None = None) -> AliasEvent | None:
        validate_alias(name)
        with self._lock():
            index = self._read_index()
            self._load(version, index)
            previous = index["aliases"].get(name)
            if previous == version:
                return None
            event = AliasEvent(
                alias=name,
                from_version=previous,
                to_version=version,
                user=user or _current_user(),
                time=_now(),
                reason=reason,
            )
            index["aliases"][name] = version
            index["alias_history"].append(asdict(event))
            write_json_atomic(self._index_path, index, fsync=True)
        return event

    def alias_history(self, name: str | None = None) -> list[AliasEvent]:
        if name is not None:
            validate_alias(name)
        events = (AliasEvent(**e) for e in self._read_index()["alias_history"])
        return [e for e in events if name is None or e.alias == name]
