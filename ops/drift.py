"""Data drift (live features vs the dataset's reference statistics) and concept drift (windowed quality).

Tests per feature, computed column-at-a-time with numpy/pyarrow (no per-row Python):

- dense (on ``log1p(max(x, 0))``, missing excluded): ``ks`` two-sample Kolmogorov–Smirnov statistic
  against the stored reference sample, ``psi`` population stability index over the reference's
  quantile bins;
- categorical: ``js`` Jensen–Shannon distance (base 2) over the reference's most frequent values plus
  one ``other`` bin for everything else (new values included);
- every feature: ``missing``, the absolute change of the missing rate.

Thresholds are sample-size aware: each test flags drift when its value exceeds
``max(effect floor, null quantile)``. The null quantile is what sampling noise alone reaches with
probability ``alpha / number of tests`` (Bonferroni, so a no-drift report raises any alarm with
probability at most about ``alpha``) given the reference and current sample sizes: the KS critical
value, ``chi2(df) * (1/n + 1/m)`` for PSI, ``chi2(df) * (1/n + 1/m) / 8`` for the JS divergence and
the two-proportion z bound for missing rates. Small windows are thus protected from noise, and at
large samples the floors keep statistically detectable but practically irrelevant shifts quiet.
Categories whose expected count in the smaller sample is below ``min_expected`` are folded into
``other`` so the chi-square approximation holds (20 keeps small windows near the nominal rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from scipy.spatial.distance import jensenshannon
from scipy.special import chdtri, ndtri
from scipy.stats import binom

from recops.errors import RecopsError
from recops.training.stats import Reference, categorical_values, dense_matrix


@dataclass(frozen=True)
class DriftConfig:
    """Thresholds of the data- and concept-drift tests."""

    alpha: float = 0.01  # false-alarm probability of one whole no-drift report (Bonferroni-split)
    ks_min: float = 0.05  # KS statistic floor
    psi_min: float = 0.1  # PSI floor
    js_min: float = 0.1  # Jensen–Shannon distance floor (base 2)
    missing_min: float = 0.02  # absolute missing-rate change floor
    top_k: int = 100  # at most this many reference values are compared one by one; the rest is "other"
    min_expected: float = 20.0  # a value gets its own bin only if expected this often in the smaller sample
    dense_tests: tuple[str, ...] = ("ks", "psi")
    auc_drop_min: float = 0.02  # concept drift: absolute AUC drop floor
    logloss_rise_min: float = 0.05  # concept drift: relative logloss rise

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise RecopsError(f"drift config: alpha must be in (0, 1), got {self.alpha}")
        unknown = set(self.dense_tests) - {"ks", "psi"}
        if unknown or not self.dense_tests:
            raise RecopsError(
                f"drift config: dense_tests {self.dense_tests} must be a non-empty subset of ('ks', 'psi')"
            )
        if self.top_k < 1 or self.min_expected <= 0:
            raise RecopsError("drift config: top_k must be >= 1 and min_expected > 0")


@dataclass(frozen=True)
class FeatureTest:
    """One test of one feature."""

    feature: str
    test: str
    value: float  # NaN when the test cannot run (no present values on one side)
    threshold: float
    drifted: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "test": self.test,
            "value": _json_float(self.value),
            "threshold": _json_float(self.threshold),
            "drifted": self.drifted,
        }


@dataclass
class DriftReport:
    """All tests of one comparison; a feature drifted when any of its tests did."""

    tests: list[FeatureTest]
    reference_rows: int
    current_rows: int
    features: tuple[str, ...]  # every tested feature, in schema order

    @property
    def drifted_features(self) -> list[str]:
        flagged = {t.feature for t in self.tests if t.drifted}
        return [f for f in self.features if f in flagged]

    def primary(self, feature: str) -> FeatureTest:
        """The feature's most telling test: the drifted (else any) one furthest past its threshold."""
        rows = [t for t in self.tests if t.feature == feature]
        return max(rows, key=lambda t: (t.drifted, _ratio(t)))

    def to_dict(self) -> dict[str, Any]:
        features = {}
        for name in self.features:
            features[name] = {
                **self.primary(name).to_dict(),
                "tests": {t.test: t.to_dict() for t in self.tests if t.feature == name},
            }
        return {
            "features": features,
            "drifted_features": self.drifted_features,
            "reference_rows": self.reference_rows,
            "current_rows": self.current_rows,
        }


@dataclass(frozen=True)
class ConceptVerdict:
    """Whether windowed model quality fell below the model's validation figures."""

    drifted: bool
    auc_drop: float  # baseline - window (positive = worse)
    auc_threshold: float
    logloss_rise: float  # window / baseline - 1 (positive = worse)
    logloss_threshold: float
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {k: (_json_float(v) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _ratio(t: FeatureTest) -> float:
    return t.value / t.threshold if math.isfinite(t.value) and t.threshold > 0 else -1.0


def _check_columns(current: pd.DataFrame, reference: Reference) -> None:
    spec = reference.spec
    missing = [c for c in (*spec.dense, *reference.categorical) if c not in current]
    if missing:
        raise RecopsError(f"drift: current data lacks columns {missing}; it must have the reference's schema columns")
    if len(current) == 0:
        raise RecopsError("drift: current data has no rows; pass a non-empty window")


def _missing_tests(
    names: list[str], ref_rates: np.ndarray, n: int, missing: np.ndarray, m: int, alpha: float, config: DriftConfig
) -> list[FeatureTest]:
    """Missing-rate change per feature. Noise bound: the larger of the two-proportion z bound and the
    exact binomial tail of the current count under the reference rate (small windows, rare missing)."""
    rates = missing / m
    pooled = (ref_rates * n + missing) / (n + m)
    normal = ndtri(1 - alpha / 2) * np.sqrt(pooled * (1 - pooled) * (1 / n + 1 / m))
    upper = binom.isf(alpha / 2, m, ref_rates) / m - ref_rates
    lower = ref_rates - binom.ppf(alpha / 2, m, ref_rates) / m
    thresholds = np.maximum(config.missing_min, np.maximum(normal, np.where(rates >= ref_rates, upper, lower)))
    values = np.abs(rates - ref_rates)
    return [FeatureTest(f, "missing", float(v), float(t), bool(v > t)) for f, v, t in zip(names, values, thresholds)]


def _ks_statistic(ref: np.ndarray, cur: np.ndarray) -> float:
    """Two-sample KS statistic of sorted samples: the largest CDF gap, checked at every distinct value."""
    points = np.concatenate([_distinct_sorted(ref), _distinct_sorted(cur)])
    gap = np.searchsorted(ref, points, side="right") / ref.size - np.searchsorted(cur, points, side="right") / cur.size
    return float(np.abs(gap).max())


def _distinct_sorted(x: np.ndarray) -> np.ndarray:
    return x[np.concatenate([x[1:] != x[:-1], [True]])]


def _smoothed(counts: np.ndarray) -> np.ndarray:
    return (counts + 0.5) / (counts.sum() + 0.5 * counts.size)


def _psi(ref_counts: np.ndarray, cur_counts: np.ndarray) -> float:
    p, q = _smoothed(ref_counts), _smoothed(cur_counts)
    return float(np.sum((q - p) * np.log(q / p)))


def _dense_tests(
    name: str, values: np.ndarray, reference: Reference, alpha: float, config: DriftConfig
) -> list[FeatureTest]:
    """KS and/or PSI of one dense feature (values transformed, NaN = missing)."""
    stats = reference.stats["dense"][name]
    cur = np.sort(values[~np.isnan(values)])
    ref = reference.dense_sorted[name]
    n, m = ref.size, cur.size
    if n == 0 or m == 0:
        floor = {"ks": config.ks_min, "psi": config.psi_min}
        return [FeatureTest(name, t, float("nan"), floor[t], False) for t in config.dense_tests]
    scale = 1 / n + 1 / m
    tests = []
    if "ks" in config.dense_tests:
        d = _ks_statistic(ref, cur)
        threshold = max(config.ks_min, math.sqrt(-math.log(alpha / 2) / 2 * scale))
        tests.append(FeatureTest(name, "ks", d, threshold, d > threshold))
    if "psi" in config.dense_tests:
        edges = np.asarray(stats["edges"], dtype=np.float64)
        ref_counts = np.asarray(stats["fractions"]) * n
        cur_counts = np.diff(np.concatenate([[0], np.searchsorted(cur, edges, side="left"), [m]]))
        psi = _psi(ref_counts, cur_counts)
        threshold = max(config.psi_min, float(chdtri(max(edges.size, 1), alpha)) * scale)
        tests.append(FeatureTest(name, "psi", psi, threshold, psi > threshold))
    return tests


def _js_test(name: str, values: pa.Array, reference: Reference, alpha: float, config: DriftConfig) -> FeatureTest:
    """Jensen–Shannon distance over the reference's frequent values (enough expected count) + "other"."""
    stats = reference.stats["categorical"][name]
    n, m = int(stats["count"]), len(values)
    if n == 0 or m == 0:
        return FeatureTest(name, "js", float("nan"), config.js_min, False)
    top = stats["top"][: config.top_k]
    fractions = np.array([f for _, f in top])
    k = int(np.sum(fractions * min(n, m) >= config.min_expected))
    codes = pc.index_in(values, value_set=pa.array([v for v, _ in top[:k]], type=pa.large_string()))
    codes = codes.fill_null(-1).to_numpy(zero_copy_only=False)
    cur_counts = np.bincount(codes + 1, minlength=k + 1)
    ref_probs = np.concatenate([[max(1.0 - fractions[:k].sum(), 0.0)], fractions[:k]])
    js = float(jensenshannon(ref_probs, cur_counts / m, base=2))
    noise = math.sqrt(float(chdtri(max(k, 1), alpha)) * (1 / n + 1 / m) / 8 / math.log(2))
    threshold = max(config.js_min, noise)
    return FeatureTest(name, "js", js, threshold, js > threshold)


def detect_drift(reference: Reference, current: pd.DataFrame, config: DriftConfig | None = None) -> DriftReport:
    """Compare ``current`` raw rows (the reference's schema columns) with the reference statistics."""
    config = config or DriftConfig()
    _check_columns(current, reference)
    spec = reference.spec
    names = [*spec.dense, *reference.categorical]
    alpha = config.alpha / (len(spec.dense) * (1 + len(config.dense_tests)) + 2 * len(reference.categorical))
    dense = dense_matrix(current, spec.dense)
    missing = list(np.isnan(dense).sum(axis=0))
    tests: list[FeatureTest] = []
    for j, name in enumerate(spec.dense):
        tests += _dense_tests(name, dense[:, j], reference, alpha, config)
    for name in reference.categorical:
        values, n_missing = categorical_values(current, name, spec)
        missing.append(n_missing)
        tests.append(_js_test(name, values, reference, alpha, config))
    ref_rates = np.array(
        [reference.stats["dense" if f in spec.dense else "categorical"][f]["missing_rate"] for f in names]
    )
    tests += _missing_tests(
        names, ref_rates, reference.rows, np.array(missing, dtype=np.float64), len(current), alpha, config
    )
    return DriftReport(tests, reference.rows, len(current), tuple(names))


def _auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC estimated from P positives and N negatives."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (positives - 1) * (q1 - auc**2) + (negatives - 1) * (q2 - auc**2)) / (
        positives * negatives
    )
    return math.sqrt(max(var, 0.0))


def concept_drift(
    window_auc: float,
    window_logloss: float,
    baseline_auc: float,
    baseline_logloss: float,
    config: DriftConfig | None = None,
    positives: int | None = None,
    negatives: int | None = None,
) -> ConceptVerdict:
    """Concept drift when the window's AUC fell or its logloss rose past the thresholds.

    The AUC threshold is ``max(auc_drop_min, z(1 - alpha) * standard error)`` when the window's
    positives/negatives are given (small windows are noisy), else ``auc_drop_min``. The logloss
    threshold is the relative rise ``logloss_rise_min``. An undefined window AUC (one class only)
    is never drift by itself.
    """
    config = config or DriftConfig()
    auc_drop = baseline_auc - window_auc
    auc_threshold = config.auc_drop_min
    if positives and negatives and math.isfinite(window_auc):
        auc_threshold = max(
            auc_threshold, float(ndtri(1 - config.alpha)) * _auc_standard_error(window_auc, positives, negatives)
        )
    rise = window_logloss / baseline_logloss - 1 if baseline_logloss > 0 else float("nan")
    reasons = []
    if math.isfinite(auc_drop) and auc_drop > auc_threshold:
        reasons.append(
            f"AUC {window_auc:.4f} is {auc_drop:.4f} below the baseline {baseline_auc:.4f} "
            f"(threshold {auc_threshold:.4f})"
        )
    if math.isfinite(rise) and rise > config.logloss_rise_min:
        reasons.append(
            f"logloss {window_logloss:.4f} is {rise:.1%} above the baseline {baseline_logloss:.4f} "
            f"(threshold {config.logloss_rise_min:.1%})"
        )
    return ConceptVerdict(
        bool(reasons), float(auc_drop), float(auc_threshold), float(rise), config.logloss_rise_min, reasons
    )
