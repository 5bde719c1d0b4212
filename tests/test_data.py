"""Data pipeline: synthetic generator, validation with counted rejects, shared preprocessing, versions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recops.errors import RecopsError
from recops.training.dataset import BottomKSample, Dataset, SplitConfig, ingest
from recops.training.hashing import row_keys, source_key
from recops.training.metrics import auc
from recops.training.preprocess import MISSING_ID, Preprocessor
from recops.training.readers import read_frame
from recops.training.spec import ColumnSpec, PreprocessConfig
from recops.training.synth import SynthConfig, generate, write
from tests.conftest import recops


def test_synth_plants_a_learnable_signal_and_is_seeded(tmp_path):
    summary = write(SynthConfig(rows=5000, seed=3), tmp_path / "a")
    again = write(SynthConfig(rows=5000, seed=3), tmp_path / "b")
    assert (tmp_path / "a" / "data.tsv").read_bytes() == (tmp_path / "b" / "data.tsv").read_bytes()
    assert summary == {**again, "data": summary["data"], "truth": summary["truth"]}
    assert 0.2 < summary["positive_rate"] < 0.3
    truth = np.load(tmp_path / "a" / "truth.npy")
    labels = read_frame(tmp_path / "a" / "data.tsv")["label"].to_numpy()
    assert summary["oracle_auc"] == pytest.approx(auc(labels, truth))
    assert summary["oracle_auc"] > 0.85  # the planted function carries real signal


def test_synth_drift_knobs_move_distributions_and_the_click_function():
    base = generate(SynthConfig(rows=20_000, seed=1))
    covariate = generate(SynthConfig(rows=20_000, seed=1, covariate_drift=0.5))
    concept = generate(SynthConfig(rows=20_000, seed=1, concept_drift=0.8))
    top = lambda d, f: np.bincount(d.ranks[:, f][d.ranks[:, f] >= 0]).argmax()  # noqa: E731
    assert top(base, 0) != top(covariate, 0)  # C1 drifts
    assert top(base, 8) == top(covariate, 8)  # C9 does not
    assert np.nanmedian(covariate.dense[:, 0]) > 1.5 * np.nanmedian(base.dense[:, 0])
    np.testing.assert_array_equal(base.ranks, concept.ranks)  # same features ...
    assert auc(concept.label, base.truth) < auc(concept.label, concept.truth) - 0.05  # ... different clicks


def _criteo_line(label="1", dense=None, cats=None) -> str:
    dense = dense if dense is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else ["0a1b2c3d"] * 26
    return "\t".join([label, *dense, *cats])


def test_ingest_counts_and_keeps_every_rejected_row(tmp_path):
    good = _criteo_line()
    rows = [
        good,
        "1\t2\t3",  # field count
        _criteo_line(label="2"),  # bad label
        _criteo_line(dense=["x"] + [""] * 12),  # non-numeric dense
        _criteo_line(dense=[""] * 13, cats=[""] * 26),  # all-missing features are valid
        good,
        "",  # an empty line is a field-count reject, not silently skipped
        good,
    ]
    raw = tmp_path / "raw.tsv"
    raw.write_text("\n".join(rows) + "\n")
    ds = ingest([raw], tmp_path / "ds", config=PreprocessConfig(table_size=50), split=SplitConfig(0.0, 0.0))
    assert ds.rows["total"] == 4 and ds.rows["train"] == 4
    assert ds.rejected == {"field_count": 2, "non_numeric_dense": 1, "bad_label": 1, "total": 4}
    lines = (ds.path / "rejects.tsv").read_text().splitlines()
    assert lines[0] == "file\tline\treason\trow"
    rejects = {int(line): (reason, row) for _, line, reason, row in (entry.split("\t", 3) for entry in lines[1:])}
    assert {k: v[0] for k, v in rejects.items()} == {
        2: "field_count",
        3: "bad_label",
        4: "non_numeric_dense",
        7: "field_count",
    }
    assert rejects[2][1] == "1\t2\t3" and rejects[3][1].startswith("2\t0\t1") and rejects[7][1] == ""
    train = ds.split("train")
    assert train.sparse[1].tolist() == [MISSING_ID] * 26 and train.dense[1].tolist() == [0.0] * 13


def test_schema_mismatch_stops_with_one_clear_error(tmp_path):
    raw = tmp_path / "three_cols.tsv"
    raw.write_text("1\t2\t3\n0\t5\t6\n")
    with pytest.raises(RecopsError, match=r"three_cols.tsv: schema mismatch: no row has the expected 40 fields"):
        ingest([raw], tmp_path / "ds")
    assert not any((tmp_path / "ds").glob("*"))  # nothing half-written


def test_same_input_and_config_give_the_same_version(synth_dir, tmp_path):
    small = tmp_path / "small.tsv"
    small.write_text("".join((synth_dir / "data.tsv").open().readlines()[:2000]))
    a = ingest([small], tmp_path / "a", config=PreprocessConfig(table_size=100))
    b = ingest([small], tmp_path / "b", config=PreprocessConfig(table_size=100))
    c = ingest([small], tmp_path / "a", config=PreprocessConfig(table_size=200))
    assert a.version == b.version != c.version
    assert np.array_equal(np.asarray(a.split("train").sparse), np.asarray(b.split("train").sparse))
    stats = json.loads((a.path / "stats.json").read_text())
    assert stats  # reference statistics for drift are written with the dataset


def test_preprocessing_is_the_documented_function():
    spec = ColumnSpec(dense=("a", "b"), sparse=("c",))
    frame = pd.DataFrame({"label": [1, 0], "a": [np.e - 1, np.nan], "b": [-5.0, 0.0], "c": ["x", None]})
    out = Preprocessor(spec, PreprocessConfig(table_size=10)).transform(frame)
    np.testing.assert_allclose(out.dense, [[1.0, 0.0], [0.0, 0.0]], atol=1e-6)
    assert out.sparse[1, 0] == MISSING_ID and 1 <= out.sparse[0, 0] < 10
    vocab = Preprocessor(spec, PreprocessConfig(table_size=10, min_frequency=2)).fit(
        pd.DataFrame({"c": ["x", "x", "y"]}).assign(label=0, a=0.0, b=0.0)
    )
    assert vocab.transform(
        pd.DataFrame({"label": [0] * 3, "a": [0.0] * 3, "b": [0.0] * 3, "c": ["x", "y", None]})
    ).sparse[:, 0].tolist() == [2, 1, 0]


def test_csv_and_parquet_with_a_column_spec_and_multi_hot(tmp_path):
    spec = ColumnSpec(label="click", dense=("price",), sparse=("user", "item"), multi_hot={"tags": 3}, format="csv")
    frame = pd.DataFrame(
        {
            "click": [1, 0, 1],
            "price": [3.0, None, 1.5],
            "user": ["u1", "u2", "u1"],
            "item": ["i1", "i1", None],
            "tags": ["a|b", "", "a|b|c|d"],
            "extra": [1, 2, 3],
        }
    )
    frame.to_csv(tmp_path / "x.csv", index=False)
    ds = ingest(
        [tmp_path / "x.csv"],
        tmp_path / "ds",
        spec=spec,
        config=PreprocessConfig(table_size=100),
        split=SplitConfig(0, 0),
    )
    tags = np.asarray(ds.split("train").multi["tags"])
    assert (tags[0, :2] > 0).all() and tags[0, 2] == -1 and tags[1].tolist() == [0, -1, -1] and (tags[2] > 0).all()
    pq.write_table(
        pa.Table.from_pandas(frame.assign(tags=[["a", "b"], [], ["a", "b", "c", "d"]])), tmp_path / "x.parquet"
    )
    pds = ingest(
        [tmp_path / "x.parquet"],
        tmp_path / "pds",
        spec=ColumnSpec(**{**spec.to_dict(), "format": "parquet"}),
        config=PreprocessConfig(table_size=100),
        split=SplitConfig(0, 0),
    )
    np.testing.assert_array_equal(np.asarray(pds.split("train").multi["tags"]), tags)
    bad = ColumnSpec(label="click", dense=("price", "missing_col"), sparse=("user",), format="csv")
    with pytest.raises(RecopsError, match=r"x.csv: CSV header lacks columns \['missing_col'\]"):
        ingest([tmp_path / "x.csv"], tmp_path / "bad", spec=bad)


def test_cli_synth_and_ingest_json_contract(tmp_path):
    synth = json.loads(
        recops("data", "synth", "--rows", "3000", "--out", str(tmp_path / "raw"), "--json").stdout.splitlines()[-1]
    )
    assert synth["rows"] == 3000 and {"positive_rate", "oracle_auc"} <= set(synth)
    out = recops(
        "data",
        "ingest",
        "--input",
        str(tmp_path / "raw" / "data.tsv"),
        "--out",
        str(tmp_path / "ds"),
        "--table-size",
        "500",
        "--json",
    )
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["rows"]["total"] == 3000 and result["rejected"]["total"] == 0
    assert Dataset.open(result["path"]).version == result["version"]
    failed = recops("data", "ingest", "--input", str(tmp_path / "nope.tsv"), "--out", str(tmp_path / "ds"), check=False)
    assert failed.returncode == 2
    assert (
        failed.stderr.strip().splitlines()[-1].startswith("recops data: error: input") and "nope.tsv" in failed.stderr
    )


def test_reference_sample_is_uniform_and_parts_merge_into_the_whole():
    n, k = 100_000, 2_000
    keys = row_keys(source_key("0" * 64, "sample"), np.arange(1, n + 1))
    frame = pd.DataFrame({"row": np.arange(n)})
    sample = BottomKSample(k)
    for start in range(0, n, 1_000):
        part = frame.iloc[start : start + 1_000]
        sample.add(part, np.arange(len(part)), keys[start : start + 1_000], part["row"].to_numpy())
    rows = sample.result()["row"].to_numpy()
    assert len(rows) == k == len(np.unique(rows)) and np.all(np.diff(rows) > 0)  # distinct, in stream order
    # a uniform sample's mean row is n/2 with standard error n/sqrt(12 k) (~645); early-biased ones miss by far more
    assert abs(rows.mean() - n / 2) < 4 * n / np.sqrt(12 * k)
    counts, _ = np.histogram(rows, bins=10, range=(0, n))
    assert counts.min() > 0.7 * k / 10 and counts.max() < 1.3 * k / 10
    np.testing.assert_array_equal(rows, np.sort(np.argsort(keys, kind="stable")[:k]))  # exactly the bottom k
    merged = BottomKSample(k)
    for cut in np.array_split(np.random.default_rng(0).permutation(n), 7):  # parts of any rows, merged in any order
        part = BottomKSample(k, threshold=merged.threshold)
        part.add(frame, cut, keys[cut], cut)
        merged.merge(part)
    np.testing.assert_array_equal(merged.result()["row"].to_numpy(), rows)
    assert len(BottomKSample(k).result()) == 0
