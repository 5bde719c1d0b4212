"""Model quality on real data: MovieLens-100K ratings as clicks, recops DLRM and DCN through the user path against
logistic regression, LightGBM and DeepFM (deepctr-torch) on the same time split.

Data: MovieLens-100K as the PyPI wheel ``recbole==1.2.1`` ships it (``recbole/dataset_example/ml-100k/``, read from
the wheel, which ``pip download --no-deps`` puts into ``--cache-dir``), or a published ``ml-100k`` folder
(``--ml100k DIR``: ``u.data``, ``u.user``, ``u.item``). Nothing goes into the repository.

One CSV (``<work-dir>/ratings.csv``): user id, age (dense), gender, occupation, zip prefix; item id, release year
(dense), genres (multi-hot); hour and weekday of the timestamp (context); the rating and the timestamp. recops turns
ratings into clicks itself (``label_positive_min: 4``, ``label_negative_max: 2``: 3 is rejected and counted) and
splits by time (``--time-column timestamp --val-from 1998-03-08 --test-from 1998-03-31``, about 80/10/10). recops
runs exactly the user's commands, each a process: ``recops data ingest``, ``recops train`` (defaults: at most 20
epochs, early stopping), ``recops evaluate --split test``. The peers get the same rows (the counts are checked
against recops' split), use the validation rows for early stopping or model choice, and are timed in process.
``wall_s`` is the training command's wall time (recops: the whole ``recops train`` process, Python start included;
peers: feature encoding and fitting), ``cpu_s`` its CPU seconds (all threads; the fairer figure on a busy host).
Every model runs ``--seeds`` times; rows are means, ratios are against the best peer by test AUC. ``--prepare-only``
writes the CSV and the spec (docs/recipes.md uses it).
"""

from __future__ import annotations

import io
import os
import resource
import statistics
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recops.bench.common import (
    bench_parser,
    cores,
    format_table,
    pin_threads,
    run_json_subprocess,
    run_main,
    write_result,
)
from recops.errors import RecopsError

NAME = "quality_real"
RECBOLE = "recbole==1.2.1"
IN_WHEEL = "recbole/dataset_example/ml-100k/ml-100k"
VAL_FROM, TEST_FROM = "1998-03-08", "1998-03-31"
CATEGORICAL = ("user_id", "item_id", "gender", "occupation", "zip3", "hour", "weekday")
DENSE = ("age", "release_year")
MAX_GENRES = 6
SPEC = f"""\
format: csv
label: rating              # explicit ratings, turned into clicks by recops:
label_positive_min: 4      #   rating >= 4 -> 1
label_negative_max: 2      #   rating <= 2 -> 0; 3 is rejected and counted
dense: [{", ".join(DENSE)}]
sparse: [{", ".join(CATEGORICAL)}]
multi_hot: {{genres: {MAX_GENRES}}}
separator: "|"
"""
GENRES = (  # u.item's genre flags, in u.genre's order
    *("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama"),
    *("Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"),
)
PEERS = ("logistic_regression", "lightgbm", "deepfm")
MODELS = ("recops_dlrm", "recops_dcn", *PEERS)


def _parser():
    parser = bench_parser(__doc__)
    parser.add_argument("--ml100k", type=Path, help="a published ml-100k folder (u.data, u.user, u.item)")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/cache"), help="where the recbole wheel is kept")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/quality_real"), help="CSV, datasets, runs")
    parser.add_argument("--seeds", type=int, default=3, help="runs per model (means reported; default %(default)s)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of %(default)s")
    parser.add_argument("--prepare-only", action="store_true", help="write ratings.csv and ml100k.yaml, then stop")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per recops command")
    return parser


# ---- data --------------------------------------------------------------------------------------------


def recbole_wheel(cache: Path) -> Path:
    """The recbole wheel in ``cache``, downloaded by pip (no dependencies) when missing."""
    found = sorted(cache.glob("recbole-1.2.1-*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), RECBOLE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(cache.glob("recbole-1.2.1-*.whl"))
        if proc.returncode or not found:
            raise RecopsError(f"pip download {RECBOLE} failed: {proc.stderr.strip()[-500:]}; or pass --ml100k DIR")
    return found[0]


def _atomic_table(raw: bytes) -> pd.DataFrame:
    """A recbole atomic file (tab-separated, ``name:type`` headers) as strings."""
    frame = pd.read_csv(io.BytesIO(raw), sep="\t", dtype=str, encoding="latin-1", keep_default_na=False)
    return frame.rename(columns=lambda c: c.split(":")[0])


def read_wheel(wheel: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(ratings, users, items) from the wheel: items' genres ``|``-joined, release years as text."""
    with zipfile.ZipFile(wheel) as zf:
        ratings, users, items = (_atomic_table(zf.read(f"{IN_WHEEL}.{kind}")) for kind in ("inter", "user", "item"))
    items = items.assign(genres=items["class"].str.split().str.join("|"))
    return ratings, users[["user_id", "age", "gender", "occupation", "zip_code"]], items


def read_published(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(ratings, users, items) from GroupLens' ml-100k folder, in the wheel's column names."""

    def table(name: str, sep: str, columns: list[str]) -> pd.DataFrame:
        path = folder / name
        if not path.is_file():
            raise RecopsError(f"--ml100k {folder}: no {name}; pass the unzipped ml-100k folder")
        return pd.read_csv(path, sep=sep, header=None, names=columns, dtype=str, encoding="latin-1")

    ratings = table("u.data", "\t", ["user_id", "item_id", "rating", "timestamp"])
    users = table("u.user", "|", ["user_id", "age", "gender", "occupation", "zip_code"])
    items = table("u.item", "|", ["item_id", "title", "release_date", "video_date", "url", *GENRES])
    flags = items[list(GENRES)].to_numpy() == "1"
    items["genres"] = ["|".join(g for g, on in zip(GENRES, row) if on) for row in flags]
    title_year = items["title"].str.extract(r"\((\d{4})\)\s*$", expand=False)  # the wheel's years: Kolya (1996)
    items["release_year"] = title_year.fillna(items["release_date"].str[-4:])
    return ratings, users, items


def ratings_table(ratings: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """One row per rating with the user, item and context features (strings, empty where unknown)."""
    frame = ratings.merge(users, on="user_id", how="left").merge(
        items[["item_id", "release_year", "genres"]], on="item_id", how="left"
    )
    when = pd.to_datetime(frame["timestamp"].astype(np.int64), unit="s", utc=True)
    year = pd.to_numeric(frame["release_year"], errors="coerce")  # the wheel writes 'unkonwn' for one film
    return pd.DataFrame(
        {
            "user_id": frame["user_id"],
            "item_id": frame["item_id"],
            "rating": frame["rating"],
            "timestamp": frame["timestamp"],
            "age": frame["age"],
            "gender": frame["gender"],
            "occupation": frame["occupation"],
            "zip3": frame["zip_code"].str[:3],
            "release_year": year.astype("Int64"),
            "genres": frame["genres"],
            "hour": when.dt.hour,
            "weekday": when.dt.weekday,
        }
    )


def prepare(args) -> tuple[Path, Path, str]:
    """Write ``ratings.csv`` and ``ml100k.yaml`` into the work dir; returns their paths and the source's name."""
    if args.ml100k:
        tables, source = read_published(args.ml100k), f"published ml-100k folder ({args.ml100k.name})"
    else:
        wheel = recbole_wheel(args.cache_dir)
        tables, source = read_wheel(wheel), f"{wheel.name}: {IN_WHEEL}.*"
    args.work_dir.mkdir(parents=True, exist_ok=True)
    csv, spec = args.work_dir / "ratings.csv", args.work_dir / "ml100k.yaml"
    ratings_table(*tables).to_csv(csv, index=False)
    spec.write_text(SPEC)
    return csv, spec, source


# ---- recops, through its CLI --------------------------------------------------------------------------


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def recops_cli(args: list[str], timeout_s: float) -> tuple[dict[str, Any], dict[str, float]]:
    """``recops ARGS --json`` in its own process: its JSON, and its wall and CPU seconds."""
    start, cpu = time.perf_counter(), _children_cpu_s()
    out = run_json_subprocess(["-m", "recops.cli", *args, "--json"], timeout_s)
    return out, {"wall_s": time.perf_counter() - start, "cpu_s": _children_cpu_s() - cpu}


def ingest(csv: Path, spec: Path, work: Path, timeout_s: float) -> dict[str, Any]:
    split = ["--time-column", "timestamp", "--val-from", VAL_FROM, "--test-from", TEST_FROM]
    out, _ = recops_cli(
        ["data", "ingest", "--input", str(csv), "--spec", str(spec), "--out", str(work / "datasets"), *split], timeout_s
    )
    return out


def warm_up() -> None:
    """Load recops' training stack once, untimed, so the first timed run does not pay for a cold file cache."""
    subprocess.run([sys.executable, "-c", "import recops.training.train"], check=True, capture_output=True)


def recops_model(family: str, dataset: str, work: Path, seed: int, quick: bool, timeout_s: float) -> dict[str, Any]:
    """``recops train`` with its defaults (model family and seed aside), then ``recops evaluate`` on test."""
    registry = ["--registry", str(work / "registry")]
    run = work / "runs" / f"{family}-{seed}"
    train = ["train", "--data", dataset, "--out", str(run), "--no-resume", "--model", family, "--seed", str(seed)]
    trained, spent = recops_cli([*train, *registry, *(["--epochs", "1"] if quick else [])], timeout_s)
    version = str(trained["model_version"])
    evaluated, _ = recops_cli(["evaluate", "--model-version", version, "--data", dataset, *registry], timeout_s)
    return {
        "test_auc": evaluated["auc"],
        "test_logloss": evaluated["logloss"],
        **spent,
        "epochs": trained["epochs"],
        "val_auc": trained["val_auc"],
        "train_test_auc": trained["test_auc"],
    }


# ---- peers, on the same rows --------------------------------------------------------------------------


def peer_frame(csv: Path) -> pd.DataFrame:
    """The CSV as the peers see it: rating 3 dropped, ``label`` and ``split`` (0/1/2) as recops makes them."""
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    rating = frame["rating"].astype(float)
    frame = frame[(rating >= 4) | (rating <= 2)].reset_index(drop=True)
    frame["label"] = (frame["rating"].astype(float) >= 4).astype(int)
    when = pd.to_datetime(frame["timestamp"].astype(np.int64), unit="s", utc=True)
    cuts = [pd.Timestamp(d, tz="UTC") for d in (VAL_FROM, TEST_FROM)]
    frame["split"] = np.where(when < cuts[0], 0, np.where(when < cuts[1], 1, 2))
    for name in DENSE:
        frame[name] = pd.to_numeric(frame[name], errors="coerce")
    return frame


def _genres(frame: pd.DataFrame, train: np.ndarray):
    """Genres one-hot [N, G] (sklearn's MultiLabelBinarizer fitted on training rows)."""
    from sklearn.preprocessing import MultiLabelBinarizer

    lists = frame["genres"].str.split("|")
    encoder = MultiLabelBinarizer().fit(lists[train])
    known = set(encoder.classes_)
    return encoder.transform([[g for g in gs if g in known] for gs in lists]), list(encoder.classes_)


def _metrics(frame: pd.DataFrame, probs: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import log_loss, roc_auc_score

    test = frame["split"].to_numpy() == 2
    y = frame["label"].to_numpy()[test]
    return {"test_auc": float(roc_auc_score(y, probs[test])), "test_logloss": float(log_loss(y, probs[test]))}


def _parts(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    split = frame["split"].to_numpy()
    return split == 0, split == 1, frame["label"].to_numpy()


def logistic_regression(frame: pd.DataFrame, seed: int, quick: bool) -> dict[str, Any]:
    """One-hot categoricals and genres, standardised dense; C chosen by validation AUC."""
    import scipy.sparse as sp
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import OneHotEncoder

    train, val, y = _parts(frame)
    onehot = OneHotEncoder(handle_unknown="ignore").fit(frame.loc[train, list(CATEGORICAL)])
    dense = frame[list(DENSE)].fillna(frame.loc[train, list(DENSE)].mean())
    dense = (dense - dense[train].mean()) / dense[train].std()
    x = sp.hstack([onehot.transform(frame[list(CATEGORICAL)]), _genres(frame, train)[0], dense.to_numpy()]).tocsr()
    fits = {}
    for c in (0.3,) if quick else (0.1, 0.3, 1.0):
        model = LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(x[train], y[train])
        fits[c] = (roc_auc_score(y[val], model.predict_proba(x[val])[:, 1]), model)
    c, (_, best) = max(fits.items(), key=lambda item: item[1][0])
    return {**_metrics(frame, best.predict_proba(x)[:, 1]), "C": c}


def lightgbm(frame: pd.DataFrame, seed: int, quick: bool) -> dict[str, Any]:
    """Categoricals as LightGBM categories, dense as they are, genres as flags; early stopping on validation."""
    import lightgbm as lgb

    train, val, y = _parts(frame)
    x = pd.DataFrame({c: frame[c].astype("category") for c in CATEGORICAL})
    flags, names = _genres(frame, train)
    x = pd.concat([x, frame[list(DENSE)], pd.DataFrame(flags, columns=[f"genre_{g}" for g in names])], axis=1)
    model = lgb.LGBMClassifier(
        n_estimators=20 if quick else 2000, learning_rate=0.05, random_state=seed, n_jobs=cores(), verbose=-1
    )
    model.fit(
        x[train],
        y[train],
        eval_X=(x[val],),
        eval_y=(y[val],),
        eval_metric="auc",
        callbacks=[lgb.early_stopping(50, verbose=False)],
    )
    return {**_metrics(frame, model.predict_proba(x)[:, 1]), "trees": model.best_iteration_}


def _deepfm_inputs(frame: pd.DataFrame, train: np.ndarray) -> dict[str, np.ndarray]:
    """Ids per categorical (0 = unseen in training), min-max dense, padded genre ids."""
    data: dict[str, np.ndarray] = {}
    for c in CATEGORICAL:
        codes = {v: i + 1 for i, v in enumerate(pd.unique(frame.loc[train, c]))}
        data[c] = frame[c].map(codes).fillna(0).astype(np.int64).to_numpy()
    dense = frame[list(DENSE)].fillna(frame.loc[train, list(DENSE)].mean())
    low, high = dense[train].min(), dense[train].max()
    for c in DENSE:
        data[c] = ((dense[c] - low[c]) / (high[c] - low[c])).to_numpy(np.float32)
    vocab = {
        g: i + 1 for i, g in enumerate(sorted({g for gs in frame.loc[train, "genres"].str.split("|") for g in gs}))
    }
    ids = np.zeros((len(frame), MAX_GENRES), dtype=np.int64)
    for i, gs in enumerate(frame["genres"].str.split("|")):
        known = [vocab[g] for g in gs if g in vocab][:MAX_GENRES]
        ids[i, : len(known)] = known
    data["genres"] = ids
    return data


def deepfm(frame: pd.DataFrame, seed: int, quick: bool, work: Path) -> dict[str, Any]:
    """deepctr-torch's DeepFM (its defaults: DNN 256-128, Adam 1e-3, L2 1e-5 on embeddings), embeddings of
    recops' default dimension 16, batch 256, early stopping on validation AUC (patience 2) and its best epoch."""
    import torch
    from deepctr_torch.callbacks import EarlyStopping, ModelCheckpoint
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat, get_feature_names
    from deepctr_torch.models import DeepFM

    train, val, y = _parts(frame)
    data = _deepfm_inputs(frame, train)
    columns = [SparseFeat(c, int(data[c].max()) + 1, embedding_dim=16) for c in CATEGORICAL]
    columns += [DenseFeat(c, 1) for c in DENSE]
    genre = SparseFeat("genres", int(data["genres"].max()) + 1, embedding_dim=16)
    columns.append(VarLenSparseFeat(genre, maxlen=MAX_GENRES, combiner="mean"))
    names = get_feature_names(columns)

    def part(mask: np.ndarray | slice) -> dict[str, np.ndarray]:
        return {n: data[n][mask] for n in names}

    best = work / f"deepfm-{seed}.pt"
    model = DeepFM(columns, columns, task="binary", device="cpu", seed=seed)
    model.compile("adam", "binary_crossentropy", metrics=["auc"])
    callbacks = [
        EarlyStopping(monitor="val_auc", patience=2, mode="max"),
        ModelCheckpoint(str(best), monitor="val_auc", save_best_only=True, mode="max", save_weights_only=True),
    ]
    history = model.fit(
        part(train),
        y[train],
        batch_size=256,
        epochs=1 if quick else 20,
        verbose=0,
        validation_data=(part(val), y[val]),
        callbacks=callbacks,
    )
    model.load_state_dict(torch.load(best, weights_only=True))
    return {**_metrics(frame, model.predict(part(slice(None)), 4096).ravel()), "epochs": len(history.epoch)}


def timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``'s result with its wall and CPU seconds (this process, all threads)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return {**out, "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}


# ---- results ------------------------------------------------------------------------------------------


def summarize(runs: dict[str, list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], str | None]:
    """A row per model: means over seeds (and the spread of test AUC), ratios against the best peer."""
    rows = []
    for model, results in runs.items():
        aucs = [r["test_auc"] for r in results]
        rows.append(
            {
                "model": model,
                "seeds": len(results),
                "test_auc": statistics.mean(aucs),
                "test_auc_sd": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                "test_logloss": statistics.mean(r["test_logloss"] for r in results),
                "wall_s": statistics.mean(r["wall_s"] for r in results),
                "cpu_s": statistics.mean(r["cpu_s"] for r in results),
            }
        )
    peers = [r for r in rows if r["model"] in PEERS]
    best = max(peers, key=lambda r: r["test_auc"], default=None)
    for row in rows:
        if best:
            row["auc_minus_best_peer"] = row["test_auc"] - best["test_auc"]
            row["auc_vs_best_peer"] = row["test_auc"] / best["test_auc"]
            row["logloss_vs_best_peer"] = row["test_logloss"] / best["test_logloss"]
            row["wall_vs_best_peer"] = row["wall_s"] / best["wall_s"]
            row["cpu_vs_best_peer"] = row["cpu_s"] / best["cpu_s"]
    return rows, best and best["model"]


def aims(rows: list[dict[str, Any]], best_peer: str | None) -> dict[str, Any]:
    """Issue #11's aim: recops' best test AUC over the best peer's by >= 0.01, in less wall time than DeepFM."""
    by = {r["model"]: r for r in rows}
    ours = max((r for r in rows if r["model"].startswith("recops")), key=lambda r: r["test_auc"], default=None)
    if not ours or not best_peer:
        return {}
    margin = ours["test_auc"] - by[best_peer]["test_auc"]
    deep = by.get("deepfm")
    return {
        "best_recops": ours["model"],
        "best_peer": best_peer,
        "auc_margin": margin,
        "auc_margin_at_least_0.01": margin >= 0.01,
        "less_wall_time_than_deepfm": deep["wall_s"] > ours["wall_s"] if deep else None,
        "less_cpu_time_than_deepfm": deep["cpu_s"] > ours["cpu_s"] if deep else None,
    }


def run_models(args, models: list[str], csv: Path, dataset: str) -> tuple[dict[str, list[dict[str, Any]]], dict]:
    """Every model's runs over the seeds, and why a peer did not run (its library missing: `make bench` installs
    setup.cfg's bench extra)."""
    frame = peer_frame(csv) if set(models) & set(PEERS) else None
    peers = {
        "logistic_regression": lambda s: logistic_regression(frame, s, args.quick),
        "lightgbm": lambda s: lightgbm(frame, s, args.quick),
        "deepfm": lambda s: deepfm(frame, s, args.quick, args.work_dir),
    }
    runs: dict[str, list[dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    for model in models:
        for seed in range(args.seeds):
            print(f"[{NAME}] {model} seed {seed} ...", file=sys.stderr, flush=True)
            if model in peers:
                try:
                    result = timed(lambda m=model, s=seed: peers[m](s))
                except ImportError as exc:
                    errors[model] = f"not installed ({exc}): pip install -e '.[bench]'"
                    break
            else:
                family = model.removeprefix("recops_")
                result = recops_model(family, dataset, args.work_dir, seed, args.quick, args.timeout)
            load = round(os.getloadavg()[0], 2)  # a busy host stretches wall time, not CPU time
            runs.setdefault(model, []).append({"seed": seed, **result, "load_avg_1m": load})
    return runs, errors


def _check_split(frame: pd.DataFrame, ingested: dict[str, Any]) -> None:
    counts = {name: int((frame["split"] == i).sum()) for i, name in enumerate(("train", "val", "test"))}
    ours = {k: ingested["rows"][k] for k in counts}
    if counts != ours:
        raise RecopsError(f"the peers' split {counts} is not recops' {ours}: the comparison would not be fair")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if unknown := set(models) - set(MODELS):
        raise RecopsError(f"{NAME}: unknown models {sorted(unknown)}; choose from {MODELS}")
    args.seeds = 1 if args.quick else args.seeds
    csv, spec, source = prepare(args)
    if args.prepare_only:
        print(f"wrote {csv} and {spec} from {source}")
        return 0
    pin_threads(args.threads)
    ingested = ingest(csv, spec, args.work_dir, args.timeout)
    warm_up()
    _check_split(peer_frame(csv), ingested)
    runs, errors = run_models(args, models, csv, ingested["path"])
    rows, best_peer = summarize(runs)
    goals = aims(rows, best_peer)
    config = {
        "source": source,
        "split": {"time_column": "timestamp", "val_from": VAL_FROM, "test_from": TEST_FROM},
        "rows": ingested["rows"],
        "rejected": ingested["rejected"],
        "spec": SPEC,
        "seeds": args.seeds,
        "quick": args.quick,
        "recops": "recops data ingest; recops train --model M --seed S (defaults otherwise); recops evaluate",
        "command": f"python -m recops.bench.{NAME} --results-dir bench/results",
    }
    out = write_result(
        NAME,
        rows,
        args.results_dir,
        baseline=best_peer,
        config=config,
        aims=goals,
        runs=runs,
        errors=errors,
        plots=[
            {"kind": "bar", "x": "model", "y": "auc_minus_best_peer", "title": "test AUC minus the best peer's"},
            {
                "kind": "bar",
                "x": "model",
                "y": ["wall_s", "cpu_s"],
                "log_y": True,
                "title": "training time: wall and CPU seconds (log scale)",
            },
        ],
    )
    columns = ["model", "test_auc", "test_auc_sd", "test_logloss", "wall_s", "cpu_s", "auc_minus_best_peer"]
    print(format_table(rows, columns))
    print(goals)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main, NAME)
