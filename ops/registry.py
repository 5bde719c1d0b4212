"""Model registry: versioned checkpoints with metrics, lineage and moving aliases.

``ModelRegistry`` is the contract (small enough for an MLflow backend to implement);
``LocalRegistry`` keeps everything under one directory::

    <root>/index.json             next version, registered versions, aliases, alias history
    <root>/versions/<n>/meta.json  the immutable record of version n
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
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock

from recops.errors import RecopsError
from recops.settings import settings

ALIAS_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,63}")
INDEX_FORMAT = 1


@dataclass(frozen=True)
class CodeVersion:
    """The source tree a model was trained from."""

    git_sha: str | None = None
    dirty: bool = False


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
    """One registered model. ``aliases`` are the aliases pointing at it when it was read."""

    version: int
    created: str  # ISO 8601, UTC
    checkpoint: Path  # inside the registry
    metrics: dict[str, float]
    params: dict[str, Any]
    dataset_version: str
    lineage: Lineage
    aliases: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "checkpoint": str(self.checkpoint)}


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
        dataset_version: str,
        lineage: Lineage | None = None,
    ) -> ModelVersion:
        """Copy ``checkpoint_dir`` into the registry as the next version and return it."""

    @abc.abstractmethod
    def _next_version(self, index: dict[str, Any]) -> int:
        """The index's counter, skipped past any version directory a crashed registration left behind."""
        on_disk = [int(p.name) for p in self._versions_dir.iterdir() if p.name.isdigit()]
        return max([index["next_version"], *(v + 1 for v in on_disk)])

    def get(self, version: int) -> ModelVersion:
        """The given version; RecopsError if unknown."""

    @abc.abstractmethod
    def get_by_alias(self, name: str) -> ModelVersion:
        """The version ``name`` points at; RecopsError if no such alias."""

    @abc.abstractmethod
    def list(self) -> list[ModelVersion]:
        """All versions, oldest first."""

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
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, then replace)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
            return {"format": INDEX_FORMAT, "next_version": 1, "versions": [], "aliases": {}, "alias_history": []}
        try:
            index = json.loads(self._index_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RecopsError(f"cannot read registry index {self._index_path}: {exc}; restore it from a backup") from exc
        if index.get("format") != INDEX_FORMAT:
            raise RecopsError(f"registry index {self._index_path} has format {index.get('format')!r}, "
                              f"expected {INDEX_FORMAT}: use a recops version that wrote it")
        return index

    def register(
        self,
        checkpoint_dir: Path,
        metrics: dict[str, float],
        params: dict[str, Any],
        dataset_version: str,
        lineage: Lineage | None = None,
    ) -> ModelVersion:
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise RecopsError(f"checkpoint directory {checkpoint_dir} does not exist or is not a directory: "
                              "pass the directory the training run saved its checkpoint to")
        if not dataset_version:
            raise RecopsError("dataset_version is empty: pass the processed dataset version the model was trained on")
        lineage = lineage or Lineage()
        record = {
            "metrics": _json_payload("metrics", metrics),
            "params": _json_payload("params", params),
            "dataset_version": str(dataset_version),
            "lineage": _json_payload("lineage", asdict(lineage)),
        }
        if lineage.parent_version is not None:
            self.get(lineage.parent_version)
        self._versions_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self._versions_dir, prefix=".staging-"))
        try:
            shutil.copytree(checkpoint_dir, staging / "checkpoint")
            with self._lock():
                index = self._read_index()
                version = self._next_version(index)
                record.update(version=version, created=_now(), checkpoint="checkpoint")
                _write_json(staging / "meta.json", record)
                os.rename(staging, self._versions_dir / str(version))
                index["next_version"] = version + 1
                index["versions"].append(version)
                _write_json(self._index_path, index)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
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
        meta = json.loads((version_dir / "meta.json").read_text())
        return ModelVersion(
            version=meta["version"],
            created=meta["created"],
            checkpoint=(version_dir / meta["checkpoint"]).resolve(),
            metrics=meta["metrics"],
            params=meta["params"],
            dataset_version=meta["dataset_version"],
            lineage=Lineage.from_dict(meta["lineage"]),
            aliases=sorted(name for name, v in index["aliases"].items() if v == version),
        )

    def get_by_alias(self, name: str) -> ModelVersion:
        index = self._read_index()
        validate_alias(name)
        if name not in index["aliases"]:
            known = ", ".join(sorted(index["aliases"])) or "none"
            raise RecopsError(f"no model has alias {name!r} in registry {self.root} (aliases: {known}); "
                              f"set it with `recops models alias VERSION {name}`")
        return self._load(index["aliases"][name], index)

    def list(self) -> list[ModelVersion]:
        index = self._read_index()
        return [self._load(version, index) for version in index["versions"]]

    def set_alias(self, version: int, name: str, reason: str = "", user: str | None = None) -> AliasEvent | None:
        validate_alias(name)
        with self._lock():
            index = self._read_index()
            self._load(version, index)
            previous = index["aliases"].get(name)
            if previous == version:
                return None
            event = AliasEvent(alias=name, from_version=previous, to_version=version,
                               user=user or _current_user(), time=_now(), reason=reason)
            index["aliases"][name] = version
            index["alias_history"].append(asdict(event))
            _write_json(self._index_path, index)
        return event

    def alias_history(self, name: str | None = None) -> list[AliasEvent]:
        if name is not None:
            validate_alias(name)
        events = (AliasEvent(**e) for e in self._read_index()["alias_history"])
        return [e for e in events if name is None or e.alias == name]
