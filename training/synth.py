"""Synthetic Criteo-shaped data with a planted click function and controllable drift.

A fixed *world* (``world_seed``) defines feature distributions and the true click function; row
sampling uses ``seed``. Covariate drift moves the distributions of ``drift_features``; concept drift
blends the click function's weights towards a different random function. The true probability of
each row is saved, so the oracle AUC bounds what any model can reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from recops.errors import RecopsError
from recops.files import atomic_path
from recops.training.metrics import auc
from recops.training.spec import CRITEO_DENSE, CRITEO_SPARSE

CARDINALITIES = (
    8,
    12,
    30,
    60,
    100,
    200,
    400,
    1000,
    2000,
    5000,
    10,
    20,
    50,
    150,
    300,
    600,
    3000,
    10_000,
    30_000,
    100_000,
    15,
    25,
    80,
    250,
    800,
    50_000,
)
INFORMATIVE_SPARSE = (0, 1, 2, 3, 4, 5, 6, 7, 10, 11)
INFORMATIVE_DENSE = (0, 1, 2, 3, 4, 5)
MAX_EFFECT_RANK = 1000


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator."""

    rows: int = 100_000
    seed: int = 0
    world_seed: int = 1234
    positive_rate: float = 0.25
    covariate_drift: float = 0.0
    concept_drift: float = 0.0
    drift_features: tuple[str, ...] = ("I1", "I2", "C1", "C2", "C3")

    def __post_init__(self) -> None:
        if self.rows < 1:
            raise RecopsError(f"synth: --rows must be >= 1, got {self.rows}")
        for knob in ("covariate_drift", "concept_drift"):
            if not 0.0 <= getattr(self, knob) <= 1.0:
                raise RecopsError(f"synth: {knob} must be in [0, 1], got {getattr(self, knob)}")
        unknown = set(self.drift_features) - set(CRITEO_DENSE) - set(CRITEO_SPARSE)
        if unknown:
            raise RecopsError(f"synth: unknown drift features {sorted(unknown)}; use names I1..I13, C1..C26")


@dataclass
class SynthData:
    dense: np.ndarray  # float64 [N, 13], NaN = missing
    ranks: np.ndarray  # int64 [N, 26], -1 = missing
    vocab: list[np.ndarray]  # per feature: rank -> 8-hex string
    label: np.ndarray  # int8 [N]
    truth: np.ndarray  # float64 [N]


class World:
    """The fixed distributions and click function of one ``world_seed``."""

    def __init__(self, world_seed: int):
        rng = np.random.default_rng(world_seed)
        self.dense_scale = rng.uniform(1.0, 50.0, size=13)
        self.dense_missing = rng.uniform(0.0, 0.3, size=13)
        self.sparse_missing = rng.uniform(0.0, 0.2, size=26)
        self.zipf = rng.uniform(1.05, 1.4, size=26)
        self.vocab = [_hex_vocab(rng, k) for k in CARDINALITIES]
        self.weights = [self._weights(rng), self._weights(rng)]  # [0] the world's, [1] the concept-drift target
        self.bias = 0.0

    @staticmethod
    def _weights(rng: np.random.Generator) -> dict:
        return {
            "dense": rng.normal(0, 0.6, size=len(INFORMATIVE_DENSE)),
            "dense_sq": rng.normal(0, 0.25, size=len(INFORMATIVE_DENSE)),
            "effects": {f: rng.normal(0, 0.8, size=min(CARDINALITIES[f], MAX_EFFECT_RANK)) for f in INFORMATIVE_SPARSE},
            "u": rng.normal(0, 0.7, size=(CARDINALITIES[0], 4)),
            "v": rng.normal(0, 0.7, size=(CARDINALITIES[1], 4)),
        }


def _hex_vocab(rng: np.random.Generator, cardinality: int) -> np.ndarray:
    codes = rng.choice(2**32, size=cardinality, replace=False)
    return np.array([f"{c:08x}" for c in codes])


def _sample(rng: np.random.Generator, world: World, cfg: SynthConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    drift = set(cfg.drift_features)
    dense = np.empty((n, 13))
    for j, name in enumerate(CRITEO_DENSE):
        scale = world.dense_scale[j] * (1.0 + 3.0 * cfg.covariate_drift * (name in drift))
        dense[:, j] = np.floor(rng.lognormal(0.0, 1.0, size=n) * scale)
        dense[rng.random(n) < world.dense_missing[j], j] = np.nan
    ranks = np.empty((n, 26), dtype=np.int64)
    for f, name in enumerate(CRITEO_SPARSE):
        k = CARDINALITIES[f]
        p = 1.0 / np.arange(1, k + 1) ** world.zipf[f]
        r = np.minimum(np.searchsorted(np.cumsum(p / p.sum()), rng.random(n)), k - 1)
        if name in drift and cfg.covariate_drift > 0:
            r = (r + max(1, int(round(cfg.covariate_drift * min(k, 50))))) % k
        r[rng.random(n) < world.sparse_missing[f]] = -1
        ranks[:, f] = r
    return dense, ranks


def _logit(world: World, weights: dict, dense: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    z = np.log1p(np.nan_to_num(dense[:, INFORMATIVE_DENSE], nan=0.0))
    z = (z - 2.5) / 1.2
    logit = z @ weights["dense"] + (np.tanh(z) ** 2) @ weights["dense_sq"]
    for f, effect in weights["effects"].items():
        r = ranks[:, f]
        known = (r >= 0) & (r < len(effect))
        logit[known] += effect[r[known]]
    both = (ranks[:, 0] >= 0) & (ranks[:, 1] >= 0)
    logit[both] += np.sum(weights["u"][ranks[both, 0]] * weights["v"][ranks[both, 1]], axis=1)
    return logit


def _blend(a: dict, b: dict, c: float) -> dict:
    if isinstance(a, dict):
        return {k: _blend(a[k], b[k], c) for k in a}
    return (1.0 - c) * a + c * b


def generate(cfg: SynthConfig) -> SynthData:
    """Sample rows and their true click probabilities."""
    world = World(cfg.world_seed)
    weights = _blend(world.weights[0], world.weights[1], cfg.concept_drift)
    calib_rng = np.random.default_rng(cfg.world_seed + 1)
    base = _logit(world, world.weights[0], *_sample(calib_rng, world, SynthConfig(rows=20_000), 20_000))
    bias = _solve_bias(base, cfg.positive_rate)
    rng = np.random.default_rng(cfg.seed)
    dense, ranks = _sample(rng, world, cfg, cfg.rows)
    truth = 1.0 / (1.0 + np.exp(-(_logit(world, weights, dense, ranks) + bias)))
    label = (rng.random(cfg.rows) < truth).astype(np.int8)
    return SynthData(dense=dense, ranks=ranks, vocab=world.vocab, label=label, truth=truth)


def _solve_bias(logit: np.ndarray, rate: float) -> float:
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def to_table(data: SynthData) -> pa.Table:
    """Criteo column order: label, I1..I13, C1..C26 (nulls for missing)."""
    columns = {"label": pa.array(data.label.astype(np.int64))}
    for j, name in enumerate(CRITEO_DENSE):
        col = data.dense[:, j]
        columns[name] = pa.array(np.nan_to_num(col, nan=0).astype(np.int64), mask=np.isnan(col))
    for f, name in enumerate(CRITEO_SPARSE):
        r = data.ranks[:, f]
        columns[name] = pa.array(data.vocab[f][np.maximum(r, 0)], mask=r < 0)
    return pa.table(columns)


def write(cfg: SynthConfig, out: Path) -> dict:
    """Write ``out/data.tsv`` and ``out/truth.npy``; return a summary."""
    data = generate(cfg)
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    with atomic_path(out / "data.tsv") as tmp:
        pacsv.write_csv(to_table(data), tmp, write_options=options)
    with atomic_path(out / "truth.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, data.truth)
    return {
        "rows": cfg.rows,
        "positive_rate": float(data.label.mean()),
        "oracle_auc": auc(data.label, data.truth),
        "data": str(out / "data.tsv"),
        "truth": str(out / "truth.npy"),
        "covariate_drift": cfg.covariate_drift,
        "concept_drift": cfg.concept_drift,
    }
