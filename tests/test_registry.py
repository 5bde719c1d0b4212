"""Model registry: versions, lineage, moving aliases, multi-process safety, and `recops models`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recops.ops.registry import CodeVersion, Lineage, LocalRegistry, default_registry_root
from recops.errors import RecopsError

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(path: Path, payload: bytes = b"weights") -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(payload)
    (path / "sub").mkdir()
    (path / "sub" / "state.json").write_text('{"step": 3}')
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_register_copies_checkpoint_and_records_lineage(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "reg")
    source = make_checkpoint(tmp_path / "run1" / "ckpt", b"v1-weights")
    lineage = Lineage(
        sweep_id="sweep-7",
        trial_id="trial_0003",
        code=CodeVersion("abc123", dirty=True),
        libraries={"torch": "2.13.0"},
        hardware={"gpu": "none", "cpus": 2},
    )
    first = registry.register(source, {"auc": 0.79, "logloss": 0.45}, {"lr": 0.01, "dims": [16]}, "ds-1", lineage)
    second = registry.register(source, {"auc": 0.80}, {"lr": 0.02}, "ds-1", Lineage(parent_version=first.version))

    assert (first.version, second.version) == (1, 2)
    assert first.checkpoint.is_relative_to(registry.root) and first.checkpoint != second.checkpoint
    for path in sorted(source.parent.rglob("*"), reverse=True):  # the experiment dir goes away...
        path.unlink() if path.is_file() else path.rmdir()
    assert (first.checkpoint / "model.safetensors").read_bytes() == b"v1-weights"  # ...the copy stays
    assert (first.checkpoint / "sub" / "state.json").read_text() == '{"step": 3}'

    reread = LocalRegistry(tmp_path / "reg").get(1)
    assert reread == first
    assert reread.lineage.code == CodeVersion("abc123", True) and reread.lineage.hardware["cpus"] == 2
    assert reread.params == {"lr": 0.01, "dims": [16]} and reread.metrics["logloss"] == 0.45
    assert registry.get(2).lineage.parent_version == 1
    assert [v.version for v in registry.list()] == [1, 2]


def test_alias_moves_and_history_records_each_move(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "reg")
    for i in range(3):
        registry.register(make_checkpoint(tmp_path / f"c{i}"), {"auc": 0.7 + i / 100}, {}, "ds")

    registry.set_alias(1, "production", reason="first deploy", user="alice")
    registry.set_alias(2, "candidate", reason="sweep winner", user="bob")
    moved = registry.set_alias(2, "production", reason="beat v1 by 0.01 AUC", user="bob")
    registry.set_alias(1, "archived", user="bob")

    assert registry.get_by_alias("production").version == 2
    assert registry.get(1).aliases == ["archived"]
    assert registry.get(2).aliases == ["candidate", "production"]
    assert registry.get(3).aliases == []
    assert (moved.from_version, moved.to_version, moved.user, moved.reason) == (1, 2, "bob", "beat v1 by 0.01 AUC")
    assert registry.set_alias(2, "production") is None  # already there: no move, no event

    production = registry.alias_history("production")
    assert [(e.from_version, e.to_version) for e in production] == [(None, 1), (1, 2)]
    assert [e.alias for e in registry.alias_history()] == ["production", "candidate", "production", "archived"]
    assert all(e.time for e in registry.alias_history())


@pytest.mark.parametrize("name", ["Production", "1st", "", "prod stage", "a/b", "x" * 65, "-x"])
def test_bad_alias_names_are_rejected(tmp_path: Path, name: str) -> None:
    registry = LocalRegistry(tmp_path / "reg")
    registry.register(make_checkpoint(tmp_path / "c"), {}, {}, "ds")
    with pytest.raises(RecopsError, match="invalid alias"):
        registry.set_alias(1, name)
    assert registry.alias_history() == []


def test_unknown_versions_and_aliases_give_clear_errors(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "reg")
    registry.register(make_checkpoint(tmp_path / "c"), {}, {}, "ds")
    with pytest.raises(RecopsError, match=r"unknown model version 9 .*registered: 1"):
        registry.get(9)
    with pytest.raises(RecopsError, match="unknown model version 9"):
        registry.set_alias(9, "production")
    with pytest.raises(RecopsError, match=r"no model has alias 'production'.*recops models alias"):
        registry.get_by_alias("production")


@pytest.mark.parametrize("case", ["missing_checkpoint", "file_not_dir", "unserialisable_metrics", "unknown_parent"])
def test_failed_registration_writes_nothing(tmp_path: Path, case: str) -> None:
    root = tmp_path / "reg"
    registry = LocalRegistry(root)
    registry.register(make_checkpoint(tmp_path / "good"), {"auc": 0.7}, {}, "ds")
    before = snapshot(root)
    checkpoint, metrics, lineage = make_checkpoint(tmp_path / "c"), {"auc": 0.8}, None
    if case == "missing_checkpoint":
        checkpoint = tmp_path / "nope"
    elif case == "file_not_dir":
        checkpoint = checkpoint / "model.safetensors"
    elif case == "unserialisable_metrics":
        metrics = {"auc": object()}
    else:
        lineage = Lineage(parent_version=42)
    with pytest.raises(RecopsError):
        registry.register(checkpoint, metrics, {}, "ds", lineage)
    assert snapshot(root) == before
    assert [p.name for p in (root / "versions").iterdir()] == ["1"]  # no staging dir left behind


def test_failed_first_registration_creates_no_registry(tmp_path: Path) -> None:
    with pytest.raises(RecopsError, match="does not exist"):
        LocalRegistry(tmp_path / "reg").register(tmp_path / "missing", {}, {}, "ds")
    assert not (tmp_path / "reg").exists()


def test_version_dir_left_by_a_crash_is_never_reused(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "reg")
    registry.register(make_checkpoint(tmp_path / "a"), {}, {}, "ds")
    (registry.root / "versions" / "2").mkdir()  # renamed into place, index never updated
    assert registry.register(make_checkpoint(tmp_path / "b"), {}, {}, "ds").version == 3
    assert [v.version for v in registry.list()] == [1, 3]


REGISTER_MANY = """
import sys
from pathlib import Path
from recops.ops.registry import Lineage, LocalRegistry
registry, checkpoint, tag = LocalRegistry(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
for trial in range(6):
    registry.register(checkpoint, {"trial": trial}, {"proc": tag}, "ds", Lineage(trial_id=f"{tag}-{trial}"))
"""


def test_concurrent_registrations_from_two_processes(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", REGISTER_MANY, str(root), str(make_checkpoint(tmp_path / tag)), tag],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("a", "b")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err

    index = json.loads((root / "index.json").read_text())
    assert index["versions"] == list(range(1, 13)) and index["next_version"] == 13
    versions = LocalRegistry(root).list()
    assert sorted(v.lineage.trial_id for v in versions) == sorted(f"{t}-{i}" for t in "ab" for i in range(6))
    for v in versions:
        assert (v.checkpoint / "model.safetensors").is_file() and v.params["proc"] == v.lineage.trial_id[0]
    assert sorted(p.name for p in (root / "versions").iterdir()) == sorted(map(str, range(1, 13)))


def test_default_root_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RECOPS_REGISTRY", raising=False)
    assert default_registry_root() == Path("runs/registry")
    monkeypatch.setenv("RECOPS_REGISTRY", str(tmp_path / "r"))
    assert LocalRegistry().root == tmp_path / "r"


def recops(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recops.cli", "models", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_cli_list_show_alias(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "reg")
    registry.register(make_checkpoint(tmp_path / "a"), {"auc": 0.78}, {"lr": 0.1}, "ds-1")
    registry.register(make_checkpoint(tmp_path / "b"), {"auc": 0.81}, {"lr": 0.2}, "ds-2")
    reg = ["--registry", str(registry.root)]

    moved = recops("alias", "2", "production", "--reason", "better auc", "--json", *reg)
    assert moved.returncode == 0, moved.stderr
    event = json.loads(moved.stdout.splitlines()[-1])["event"]
    assert (event["from_version"], event["to_version"], event["reason"]) == (None, 2, "better auc")

    listed = recops("list", "--json", *reg)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout.splitlines()[-1])["versions"]
    assert [(r["version"], r["aliases"], r["dataset_version"], r["metrics"]) for r in rows] == [
        (1, [], "ds-1", {"auc": 0.78}),
        (2, ["production"], "ds-2", {"auc": 0.81}),
    ]
    assert Path(rows[1]["checkpoint"]) == registry.get(2).checkpoint

    table = recops("list", *reg).stdout.splitlines()
    assert table[0].split()[:2] == ["VERSION", "ALIASES"] and table[2].split()[:2] == ["2", "production"]

    shown = json.loads(recops("show", "1", "--json", *reg).stdout.splitlines()[-1])
    assert shown["params"] == {"lr": 0.1} and shown["lineage"]["parent_version"] is None

    for args, message in [(("show", "5"), "unknown model version 5"), (("alias", "1", "Prod"), "invalid alias")]:
        failed = recops(*args, "--json", *reg)
        assert failed.returncode == 2 and message in failed.stderr and failed.stdout == ""
