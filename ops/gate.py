"""The loop's validation gate: may a retrained model go near production?

Judged on the holdout (test split) of the candidate's NEW dataset: ONNX parity of its export (the export's own
gate), finite scores, AUC not worse than the served production model's by more than ``auc_margin``, and no slice
of the most frequent values of ``slice_features`` collapsing. Both models are scored by the same evaluation code
``recops evaluate`` uses (``recops.serving.scorers``, ``recops.ops.evaluate``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from recops.errors import RecopsError
from recops.ops.decision import Decision, fmt
from recops.ops.evaluate import metrics
from recops.ops.loop_config import GateConfig
from recops.serving.export import ExportedModel, ParityError, check_parity
from recops.serving.onnx_model import preprocessor_dict
from recops.serving.scorers import OnnxScorer
from recops.training.dataset import Dataset
from recops.training.metrics import auc


def validate(exported: ExportedModel, dataset_dir: str | Path, production_dir: Path, gate: GateConfig) -> Decision:
    """``pass`` or ``fail`` with the reasons; details hold the figures (rows, auc, logloss, slices, parity)."""
    dataset = Dataset.open(dataset_dir)
    try:
        parity = check_parity(exported, dataset.path)
    except ParityError as exc:
        return Decision("fail", (f"ONNX parity: {exc}",), {"parity": exc.report.to_dict()})
    if preprocessor_dict(production_dir) != dataset.preprocessor_dict:
        raise RecopsError(
            f"the production model's preprocessing differs from the new dataset {dataset.path}'s; the "
            "gate compares both models on the same processed holdout"
        )
    holdout = dataset.split("test")
    n = min(len(holdout), gate.holdout_rows)
    if n == 0:
        return Decision("fail", (f"dataset {dataset.version} has no holdout rows to validate on",), {"rows": 0})
    labels, rows = np.asarray(holdout.label[:n]), holdout.take(slice(0, n))
    cand, prod = (
        OnnxScorer(exported.directory, threads=1).score(rows),
        OnnxScorer(production_dir, threads=1).score(rows),
    )
    failures = []
    if not np.isfinite(cand).all():
        failures.append(f"{int((~np.isfinite(cand)).sum())} non-finite candidate scores on the holdout")
        cand = np.nan_to_num(cand, nan=0.5)
    both = {"candidate": metrics(labels, cand), "production": metrics(labels, prod)}
    figures = {
        "rows": n,
        **{k: {m: both[m][k] for m in both} for k in ("auc", "logloss", "normalized_entropy", "calibration")},
    }
    if None in figures["auc"].values():
        failures.append(f"holdout AUC is undefined on {n} rows (one class only)")
    elif not figures["auc"]["candidate"] >= figures["auc"]["production"] - gate.auc_margin:
        failures.append(
            f"holdout AUC {figures['auc']['candidate']:.4f} < production "
            f"{figures['auc']['production']:.4f} - margin {gate.auc_margin}"
        )
    spec = dataset.spec
    slices = slice_aucs(labels, cand, prod, np.asarray(holdout.sparse[:n]), spec.sparse, gate)
    failures += [
        f"slice {s['feature']}={s['id']} AUC {s['candidate']:.4f} < production {s['production']:.4f} "
        f"- {gate.slice_margin}"
        for s in slices
        if s["collapsed"]
    ]
    summary = (
        f"holdout ({n} rows of the new data) AUC {fmt(figures['auc']['candidate'])} vs production "
        f"{fmt(figures['auc']['production'])}, logloss {fmt(figures['logloss']['candidate'])} vs "
        f"{fmt(figures['logloss']['production'])}; parity max diff {parity.max_abs_diff:.2g}; "
        f"{len(slices)} slices checked"
    )
    details = {"summary": summary, **figures, "slices": slices, "parity": parity.to_dict()}
    return Decision("fail", tuple(failures), details) if failures else Decision("pass", (summary,), details)


def slice_aucs(
    labels: np.ndarray, cand: np.ndarray, prod: np.ndarray, sparse: np.ndarray, names: tuple[str, ...], gate: GateConfig
) -> list[dict[str, Any]]:
    """AUC of both models on the most frequent values (ids) of each slice feature that the data has, with enough
    rows of both classes."""
    out = []
    for feature in (f for f in gate.slice_features if f in names):
        column = sparse[:, names.index(feature)]
        ids, counts = np.unique(column[column != 0], return_counts=True)
        for value in ids[np.argsort(-counts)][: gate.slice_top]:
            rows = column == value
            if rows.sum() < gate.slice_min_rows or labels[rows].min() == labels[rows].max():
                continue
            c, p = auc(labels[rows], cand[rows]), auc(labels[rows], prod[rows])
            out.append(
                {
                    "feature": feature,
                    "id": int(value),
                    "rows": int(rows.sum()),
                    "candidate": c,
                    "production": p,
                    "collapsed": bool(c < p - gate.slice_margin),
                }
            )
    return out
