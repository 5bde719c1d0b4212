"""The loop's canary stage: a validated version serves a deterministic share of keys beside production, then the
arms' online metrics decide promote or roll back (:func:`compare_arms`); the registry's aliases and served records
follow every move."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from recops.ops.decision import Decision, fmt
from recops.ops.loop_config import CanaryConfig
from recops.ops.publish import record_deployment
from recops.ops.registry import ModelRegistry
from recops.serving.deploy import Deployer, DeployState
from recops.serving.repository import ModelRepository


def _weighted(rows: list[dict[str, Any]], key: str) -> float | None:
    """Impression-weighted mean of ``key`` over window metrics that have it."""
    pairs = [(r[key], r["impressions"]) for r in rows if r.get(key) is not None]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


def compare_arms(windows: list[dict[str, Any]], production: str, canary: str, config: CanaryConfig) -> Decision:
    """Canary vs production over the canary windows (impression-weighted): ``promote`` unless it is worse,
    else ``rollback``; details hold both arms' figures."""
    figures = {}
    for arm, version in (("production", production), ("canary", canary)):
        rows = [w[version] for w in windows if version in w]
        figures[arm] = {
            "version": version,
            "impressions": sum(r["impressions"] for r in rows),
            "auc": _weighted(rows, "auc"),
            "logloss": _weighted(rows, "logloss"),
        }
    prod, cand = figures["production"], figures["canary"]
    failures = []
    if not cand["impressions"]:
        failures.append("the canary received no traffic")
    elif None in (cand["auc"], cand["logloss"]):
        failures.append("the canary's online AUC/logloss is undefined (one class only)")
    elif None not in (prod["auc"], prod["logloss"]):
        if cand["auc"] < prod["auc"] - config.auc_margin:
            failures.append(f"canary AUC {cand['auc']:.4f} < production {prod['auc']:.4f} - {config.auc_margin}")
        if cand["logloss"] > prod["logloss"] * (1 + config.logloss_margin):
            failures.append(
                f"canary logloss {cand['logloss']:.4f} > production {prod['logloss']:.4f} "
                f"x {1 + config.logloss_margin:g}"
            )
    summary = (
        f"canary v{canary} AUC {fmt(cand['auc'])} logloss {fmt(cand['logloss'])} ({cand['impressions']} "
        f"rows) vs production v{production} AUC {fmt(prod['auc'])} logloss {fmt(prod['logloss'])} "
        f"({prod['impressions']} rows)"
    )
    if failures:
        return Decision("rollback", (*failures, summary), figures)
    return Decision("promote", (summary,), figures)


class Rollout:
    """Deployment moves of one model, each recorded in the registry (served status and aliases)."""

    def __init__(self, deployer: Deployer, registry: ModelRegistry, repo: ModelRepository):
        self.deployer, self.registry, self.repo = deployer, registry, repo

    def _recorded(self, before: DeployState, after: DeployState) -> DeployState:
        record_deployment(self.registry, self.repo, self.deployer.name, before, after)
        return after

    def deploy(self, version: int, registry_version: int | None, reason: str) -> DeployState:
        """``version`` becomes production (checked like every deployment); its registry version is aliased so."""
        before = self.deployer.state()
        after = self._recorded(before, self.deployer.deploy(version))
        if registry_version is not None:
            self.registry.set_alias(registry_version, "production", reason=reason)
        return after

    def start(self, version: int, share: float) -> DeployState:
        """``version`` serves ``share`` of the keys (idempotent: an already running canary is kept)."""
        before = self.deployer.state()
        if before.canary == version:
            return before
        return self._recorded(before, self.deployer.deploy(version, canary=share))

    def promote(self, registry_version: int | None, reason: str) -> DeployState:
        """The canary becomes production (and its registry version ``production``)."""
        return self._end_canary(self.deployer.promote, registry_version, "production", reason)

    def rollback(self, registry_version: int | None, reason: str) -> DeployState:
        """The canary is dropped (and its registry version aliased ``rejected``)."""
        return self._end_canary(self.deployer.rollback, registry_version, "rejected", reason)

    def _end_canary(
        self, move: Callable[[], DeployState], registry_version: int | None, alias: str, reason: str
    ) -> DeployState:
        """``move`` unless a crash already made it (no canary left), then the alias."""
        before = self.deployer.state()
        after = before if before.canary is None else self._recorded(before, move())
        if registry_version is not None:
            self.registry.set_alias(registry_version, alias, reason=reason)
        return after
