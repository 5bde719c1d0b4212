"""A user's own data, end to end through the CLI: ratings-style CSV and Criteo day files, the user's splits,
schemas with and without dense columns, every run registered, evaluation, batch scoring in process and through a
real Triton server."""

from __future__ import annotations

import gzip
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from recops.ops.registry import LocalRegistry
from recops.training.dataset import Dataset
from recops.training.spec import ColumnSpec
from tests.conftest import recops
from tests.triton_fixtures import running_server

RATINGS_SPEC = """\
format: csv
label: rating              # an explicit rating, turned into a click:
label_positive_min: 4      #   rating >= 4 -> 1
label_negative_max: 2      #   rating <= 2 -> 0 (3 is dropped and counted)
dense: [age]
sparse: [user_id, item_id, occupation]
multi_hot: {genres: 3}     # column -> most ids kept per row
separator: "|"
"""
NO_DENSE_SPEC = """\
format: csv
label: rating
label_positive_min: 4
label_negative_max: 2
dense: []
sparse: [user_id, item_id]
multi_hot: {genres: 3}
"""


def ratings(n: int, seed: int) -> pd.DataFrame:
    """MovieLens-shaped rows whose rating depends on user x item affinity, genres and age; a time column."""
    rng = np.random.default_rng(seed)
    world = np.random.default_rng(7)
    user_taste, item_appeal = world.normal(0, 1.2, 300), world.normal(0, 1.2, 400)
    item_genres = [world.choice(18, size=world.integers(1, 4), replace=False) for _ in range(400)]
    genre_bias = world.normal(0, 0.8, 18)
    users, items = rng.integers(0, 300, n), rng.integers(0, 400, n)
    age = rng.integers(18, 70, n)
    score = (
        user_taste[users]
        + item_appeal[items]
        + np.array([genre_bias[item_genres[i]].sum() for i in items])
        - 0.02 * (age - 40)
        + rng.normal(0, 0.7, n)
    )
    rating = np.clip(np.round(3 + score), 1, 5).astype(int)
    return pd.DataFrame(
        {
            "user_id": users.astype(str),
            "item_id": items.astype(str),
            "rating": rating,
            "age": age,
            "occupation": rng.choice(["student", "engineer", "artist", "other"], n),
            "genres": ["|".join(map(str, item_genres[i])) for i in items],
            "timestamp": 880_000_000 + np.sort(rng.integers(0, 30 * 86_400, n)),
        }
    )


serving = contextmanager(lambda repo, name: running_server(repo, load_models=(name,)))


def out_json(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Ratings CSV -> time-split dataset -> trained (registered) -> exported, as a user would, via the CLI."""
    root = tmp_path_factory.mktemp("userdata")
    ratings(6000, 0).to_csv(root / "ratings.csv", index=False)
    (root / "ratings.yaml").write_text(RATINGS_SPEC)
    registry, repo, datasets = root / "registry", root / "triton", root / "datasets"
    ingested = out_json(
        recops(
            "data",
            "ingest",
            "--input",
            str(root / "ratings.csv"),
            "--spec",
            str(root / "ratings.yaml"),
            "--out",
            str(datasets),
            "--table-size",
            "500",
            "--time-column",
            "timestamp",
            "--val-from",
            "881900000",
            "--test-from",
            "882250000",
            "--json",
        )
    )
    trained = out_json(
        recops(
            "train",
            "--data",
            ingested["path"],
            "--out",
            str(root / "run"),
            "--epochs",
            "3",
            "--batch-size",
            "256",
            "--registry",
            str(registry),
            "--alias",
            "candidate",
            "--json",
        )
    )
    exported = out_json(
        recops(
            "export",
            "--model-version",
            "candidate",
            "--name",
            "ratings",
            "--repo",
            str(repo),
            "--registry",
            str(registry),
            "--data",
            ingested["path"],
            "--json",
        )
    )
    return {
        "root": root,
        "registry": registry,
        "repo": repo,
        "datasets": datasets,
        "ingested": ingested,
        "trained": trained,
        "exported": exported,
    }


def test_ratings_become_clicks_and_the_time_split_is_kept(world) -> None:
    ingested, raw = world["ingested"], ratings(6000, 0)
    threes = int((raw["rating"] == 3).sum())
    assert ingested["rejected"] == {"label_between_thresholds": threes, "total": threes}
    assert ingested["rows"]["total"] == len(raw) - threes
    kept = raw[raw["rating"] != 3]
    assert ingested["rows"]["test"] == int((kept["timestamp"] >= 882250000).sum())
    assert ingested["rows"]["val"] == int(((kept["timestamp"] >= 881900000) & (kept["timestamp"] < 882250000)).sum())
    dataset = Dataset.open(ingested["path"])
    assert dataset.split_config["method"] == "time" and dataset.num_dense == 1
    assert np.asarray(dataset.split("train").multi["genres"]).shape[1] == 3


def test_a_train_run_is_registered_with_its_lineage(world) -> None:
    trained, registry = world["trained"], LocalRegistry(world["registry"])
    assert trained["model_version"] == 1 and trained["auc"] == trained["test_auc"] and trained["val_auc"] > 0.6
    version = registry.get_by_alias("candidate")
    assert version.version == 1 and set(version.metrics) == {"val_auc", "val_logloss", "test_auc", "test_logloss"}
    assert version.dataset.version == world["ingested"]["version"]
    assert version.dataset.root == Path(world["ingested"]["root"]) and version.lineage.code.git_sha
    exported = world["exported"]
    assert exported["model_version"] == 1 and exported["lineage"]["dataset"]["version"] == version.dataset.version
    shown = out_json(
        recops(
            "models",
            "show",
            "--served",
            "ratings:1",
            "--repo",
            str(world["repo"]),
            "--registry",
            str(world["registry"]),
            "--json",
        )
    )
    assert shown["registry"]["version"] == 1 and shown["lineage"]["checkpoint"] == str(version.checkpoint)


def test_resuming_onto_other_data_stops_with_the_fix(world, tmp_path) -> None:
    other = ratings(3000, 5)
    other.to_csv(tmp_path / "other.csv", index=False)
    ingested = out_json(
        recops(
            "data",
            "ingest",
            "--input",
            str(tmp_path / "other.csv"),
            "--spec",
            str(world["root"] / "ratings.yaml"),
            "--out",
            str(world["datasets"]),
            "--json",
        )
    )
    bad = recops(
        "train",
        "--data",
        ingested["path"],
        "--out",
        str(world["root"] / "run"),
        "--epochs",
        "1",
        "--no-register",
        check=False,
    )
    assert bad.returncode == 2 and "--no-resume" in bad.stderr and world["ingested"]["version"] in bad.stderr
    assert "Traceback" not in bad.stderr


def test_evaluate_a_split_a_raw_file_and_a_comparison(world, tmp_path) -> None:
    common = ["--registry", str(world["registry"]), "--json"]
    on_split = out_json(
        recops("evaluate", "--model-version", "candidate", "--data", world["ingested"]["path"], *common)
    )
    assert on_split["rows"] == world["ingested"]["rows"]["test"]
    assert on_split["auc"] == pytest.approx(world["trained"]["test_auc"], abs=1e-4)
    assert {"logloss", "normalized_entropy", "calibration", "slices"} <= set(on_split)
    assert 0.5 < on_split["calibration"]["ratio"] < 2 and 0 < on_split["normalized_entropy"] < 1.2

    ratings(2000, 9).to_csv(tmp_path / "holdout.csv", index=False)
    raw = out_json(
        recops(
            "evaluate",
            "--checkpoint",
            world["trained"]["checkpoint"],
            "--data",
            str(tmp_path / "holdout.csv"),
            "--slices",
            "occupation",
            "--compare",
            "1",
            *common,
        )
    )
    assert raw["slices"]["occupation"] and all(s["rows"] >= 50 for s in raw["slices"]["occupation"])
    same = raw["comparison"]["auc"]  # the same model twice: no difference, a CI around zero
    assert same["difference"] == pytest.approx(0.0, abs=1e-9) and same["ci"][0] <= 0 <= same["ci"][1]

    unlabelled = ratings(50, 3).drop(columns=["rating"])
    unlabelled.to_csv(tmp_path / "nolabel.csv", index=False)
    bad = recops(
        "evaluate", "--model-version", "candidate", "--data", str(tmp_path / "nolabel.csv"), *common, check=False
    )
    assert bad.returncode == 2 and "rating" in bad.stderr and "Traceback" not in bad.stderr
    unknown = recops(
        "evaluate", "--model-version", "nosuchalias", "--data", world["ingested"]["path"], *common, check=False
    )
    assert unknown.returncode == 2 and "no model has alias 'nosuchalias'" in unknown.stderr


def test_score_unlabelled_rows_in_process_and_through_triton(world, tmp_path) -> None:
    rows = ratings(700, 11).drop(columns=["rating"]).assign(request=lambda f: [f"r{i}" for i in range(len(f))])
    text = rows.to_csv(index=False).splitlines()
    text.insert(5, "broken,row")  # field count: a reject with its line number, the rest is scored
    (tmp_path / "rows.csv").write_text("\n".join(text) + "\n")
    local = out_json(
        recops(
            "score",
            "--model-version",
            "candidate",
            "--registry",
            str(world["registry"]),
            "--input",
            str(tmp_path / "rows.csv"),
            "--output",
            str(tmp_path / "local.parquet"),
            "--id-columns",
            "request,user_id",
            "--json",
        )
    )
    assert (local["rows_scored"], local["rows_rejected"]) == (700, 1)
    assert (tmp_path / "local.parquet.rejects.tsv").read_text().splitlines()[1].split("\t")[:3] == [
        "rows.csv",
        "6",
        "field_count",
    ]
    scores = pq.read_table(tmp_path / "local.parquet").to_pandas()
    assert list(scores.columns) == ["request", "user_id", "line", "score"] and len(scores) == 700
    assert scores["request"].tolist() == rows["request"].tolist() and scores["score"].between(0, 1).all()

    with serving(world["repo"], "ratings") as server:
        served = out_json(
            recops(
                "score",
                "--url",
                server.http_url,
                "--name",
                "ratings",
                "--repo",
                str(world["repo"]),
                "--input",
                str(tmp_path / "rows.csv"),
                "--output",
                str(tmp_path / "served.csv"),
                "--id-columns",
                "request",
                "--json",
            )
        )
        evaluated = out_json(
            recops(
                "evaluate",
                "--url",
                server.grpc_url,
                "--protocol",
                "grpc",
                "--name",
                "ratings",
                "--repo",
                str(world["repo"]),
                "--data",
                world["ingested"]["path"],
                "--json",
            )
        )
    assert served["rows_scored"] == 700 and served["versions"] == ["1"]
    through_triton = pd.read_csv(tmp_path / "served.csv")
    assert through_triton["version"].astype(str).eq("1").all()
    assert np.abs(through_triton["score"].to_numpy() - scores["score"].to_numpy()).max() <= 1e-6
    assert evaluated["auc"] == pytest.approx(world["trained"]["test_auc"], abs=1e-4)


def test_a_schema_without_dense_columns_trains_exports_and_serves(tmp_path) -> None:
    ratings(3000, 1).drop(columns=["age", "occupation"]).to_csv(tmp_path / "r.csv", index=False)
    (tmp_path / "spec.yaml").write_text(NO_DENSE_SPEC)
    ingested = out_json(
        recops(
            "data",
            "ingest",
            "--input",
            str(tmp_path / "r.csv"),
            "--spec",
            str(tmp_path / "spec.yaml"),
            "--out",
            str(tmp_path / "ds"),
            "--table-size",
            "500",
            "--json",
        )
    )
    trained = out_json(
        recops(
            "train",
            "--data",
            ingested["path"],
            "--out",
            str(tmp_path / "run"),
            "--epochs",
            "2",
            "--model",
            "dcn",
            "--dcn-layers",
            "1",
            "--dcn-rank",
            "4",
            "--embedding-dims",
            "auto",
            "--lr-schedule",
            "cosine",
            "--registry",
            str(tmp_path / "reg"),
            "--json",
        )
    )
    exported = out_json(
        recops(
            "export",
            "--checkpoint",
            trained["checkpoint"],
            "--name",
            "nodense",
            "--repo",
            str(tmp_path / "repo"),
            "--registry",
            str(tmp_path / "reg"),
            "--data",
            ingested["path"],
            "--json",
        )
    )
    assert [i["name"] for i in exported["inputs"]] == ["sparse", "multi_genres", "mask_genres"]
    assert exported["model_version"] == trained["model_version"], "the run was registered once"
    rows = ratings(100, 2).drop(columns=["age", "occupation", "rating"])
    rows.to_csv(tmp_path / "q.csv", index=False)
    with serving(tmp_path / "repo", "nodense") as server:
        predicted = out_json(
            recops(
                "predict",
                "--name",
                "nodense",
                "--repo",
                str(tmp_path / "repo"),
                "--url",
                server.http_url,
                "--input",
                str(tmp_path / "q.csv"),
                "--json",
            )
        )
    assert predicted["rows"] == 100 and all(0 < p < 1 for p in predicted["predictions"])


def test_criteo_day_files_split_by_file(synth_dir, tmp_path) -> None:
    """Gzip day files as published, a directory of them, the last day as the test set (MLPerf's protocol)."""
    lines = (synth_dir / "data.tsv").read_text().splitlines()
    days = tmp_path / "days"
    days.mkdir()
    for day in range(3):
        with gzip.open(days / f"day_{day}.gz", "wt") as fh:
            fh.write("\n".join(lines[day * 3000 : (day + 1) * 3000]) + "\n")
    test_day = days / "day_2.gz"
    ingested = out_json(
        recops(
            "data",
            "ingest",
            "--input",
            str(days / "day_*.gz"),  # the glob matches the test day too: it is held out, not trained on
            "--test-input",
            str(test_day),
            "--out",
            str(tmp_path / "ds"),
            "--table-size",
            "1000",
            "--val-fraction",
            "0.2",
            "--json",
        )
    )
    assert ingested["rows"]["test"] == 3000 and ingested["rows"]["train"] + ingested["rows"]["val"] == 6000
    assert ingested["split"]["method"] == "files"
    missing = recops("data", "ingest", "--input", str(days / "day_9*.gz"), "--out", str(tmp_path / "ds"), check=False)
    assert missing.returncode == 2 and "no file matches" in missing.stderr
    only_test = recops(
        "data", "ingest", "--input", str(test_day), "--test-input", str(test_day), "--out", str(tmp_path), check=False
    )
    assert only_test.returncode == 2 and "no training rows left" in only_test.stderr


def test_a_split_column_keeps_the_users_split(tmp_path) -> None:
    frame = ratings(1000, 4).assign(
        part=lambda f: np.where(f.index % 10 == 0, "test", np.where(f.index % 10 == 1, "val", "train"))
    )
    frame.loc[5, "part"] = "later"  # not a split name: rejected and counted, not guessed
    frame.to_csv(tmp_path / "r.csv", index=False)
    (tmp_path / "spec.yaml").write_text(RATINGS_SPEC)
    ingested = out_json(
        recops(
            "data",
            "ingest",
            "--input",
            str(tmp_path / "r.csv"),
            "--spec",
            str(tmp_path / "spec.yaml"),
            "--out",
            str(tmp_path / "ds"),
            "--split-column",
            "part",
            "--json",
        )
    )
    kept = frame[(frame["rating"] != 3) & (frame["part"] != "later")]
    assert ingested["rows"]["test"] == int((kept["part"] == "test").sum())
    assert ingested["rows"]["val"] == int((kept["part"] == "val").sum())
    assert ingested["rejected"].get("bad_split") == (1 if frame.loc[5, "rating"] != 3 else 0)


def test_the_readme_spec_is_valid_and_spec_mistakes_are_clear_errors(tmp_path) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("# ratings.yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "readme.yaml").write_text(block)
    spec = ColumnSpec.load(tmp_path / "readme.yaml")
    assert (spec.label, spec.dense, spec.multi_hot, spec.label_positive_min) == ("rating", ("age",), {"genres": 3}, 4)
    ratings(500, 6).to_csv(tmp_path / "r.csv", index=False)
    mistakes = {
        "multi_hot: [genres]": "multi_hot maps each list column to the most ids kept per row",
        "dense: age": "dense must be a list of column names",
        "sparse: [user_id]\ncolour: red": "unknown keys ['colour']",
        "label: rating\nlabel_positive_min: 4": "set both label_positive_min and label_negative_max",
    }
    for text, message in mistakes.items():
        (tmp_path / "bad.yaml").write_text("format: csv\n" + text + "\n")
        bad = recops(
            "data",
            "ingest",
            "--input",
            str(tmp_path / "r.csv"),
            "--spec",
            str(tmp_path / "bad.yaml"),
            "--out",
            str(tmp_path / "ds"),
            check=False,
        )
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, (text, bad.stderr)


def test_training_without_tuning_flags_stops_when_validation_stops_improving(tiny_dataset, tmp_path) -> None:
    from recops.training.config import TrainConfig

    result = out_json(
        recops(
            "train", "--data", str(tiny_dataset.path), "--out", str(tmp_path), "--no-register", "--json", timeout=600
        )
    )
    history = json.loads((tmp_path / "result.json").read_text())["history"]
    assert result["epochs"] == len(history) < TrainConfig().epochs, "early stopping ended the run"
    best = max(range(len(history)), key=lambda i: history[i]["val_auc"])
    assert len(history) - 1 - best == TrainConfig().patience and result["val_auc"] == history[best]["val_auc"]
