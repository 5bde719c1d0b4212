"""Raw-data reader: bad bytes as counted rejects or one clear error, gzip, unlabelled rows, ratings, row ids,
and the Arrow-side hashing and value rules shared with serving."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pandas as pd
import pytest

from recops.errors import RecopsError
from recops.training.dataset import SplitConfig, ingest
from recops.training.preprocess import MISSING_ID, Preprocessor
from recops.training.readers import read_chunks, read_frame
from recops.training.spec import ColumnSpec, PreprocessConfig
from tests.conftest import recops

CRITEO = ColumnSpec.criteo()


def line(label: str = "1", dense: list[str] | None = None, cats: list[str] | None = None) -> str:
    dense = dense if dense is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{i:08x}" for i in range(26)]
    return "\t".join([label, *dense, *cats])


def read(path, spec=CRITEO, **kw) -> tuple[pd.DataFrame, np.ndarray, dict[int, tuple[str, str]]]:
    chunks = list(read_chunks(path, spec, **kw))
    frames = [c.frame for c in chunks if len(c.frame)]
    rejects = {ln: (reason, text) for c in chunks for ln, reason, text in c.rejects}
    return pd.concat(frames, ignore_index=True), np.concatenate([c.lines for c in chunks]), rejects


# --- whole-file problems: one clear error naming the file and the fix ---------------------------------


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.tsv", b"", r"empty\.tsv: empty file"),
        (
            "binary.tsv",
            np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes(),
            r"binary\.tsv: binary data, not text",
        ),
        ("utf16.tsv", (line() + "\n").encode("utf-16"), r"utf16\.tsv: UTF-16 or UTF-32 text; .*iconv"),
        (
            "latin1.tsv",
            "".join(line(cats=["café"] + ["x"] * 25) + "\n" for _ in range(5)).encode("latin-1"),
            r"latin1\.tsv: no valid row .*bad_encoding.* re-encode it",
        ),
        ("blank.tsv", b"\n\n\n", r"blank\.tsv: schema mismatch"),
        ("day_0.bz2", b"BZh91AY&SY" + bytes(100), r"day_0\.bz2: bzip2-compressed; .*decompress it"),
        ("table.tsv", b"PAR1" + bytes(100), r"table\.tsv: a Parquet file; set format: parquet"),
    ],
)
def test_unreadable_files_are_one_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RecopsError, match=message):
        list(read_chunks(path, CRITEO))


def test_header_only_csv_is_an_error(tmp_path):
    spec = ColumnSpec(label="click", dense=("price",), sparse=("user",), format="csv")
    (tmp_path / "h.csv").write_text("click,price,user\n")
    with pytest.raises(RecopsError, match=r"h\.csv: no data rows after the header"):
        read_frame(tmp_path / "h.csv", spec)


def test_cli_ingest_of_bad_files_exits_2_with_the_file_and_fix(tmp_path):
    (tmp_path / "empty.tsv").write_bytes(b"")
    (tmp_path / "noise.bin").write_bytes(os.urandom(30_000))
    for name, fix in (("empty.tsv", "pass a file with rows"), ("noise.bin", "pass a Criteo TSV or CSV file")):
        result = recops("data", "ingest", "--input", str(tmp_path / name), "--out", str(tmp_path / "ds"), check=False)
        assert result.returncode == 2, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("recops data: error: input") and name in last and fix in last
        assert "Traceback" not in result.stderr


def test_truncated_gzip_is_an_error(tmp_path):
    data = gzip.compress("".join(line() + "\n" for _ in range(2000)).encode())
    (tmp_path / "cut.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(RecopsError, match=r"cut\.gz: the gzip stream is corrupt or truncated"):
        list(read_chunks(tmp_path / "cut.gz", CRITEO))


# --- bad rows in a good file: per-row rejects with line numbers, the rest read --------------------------


def test_bad_bytes_are_rejected_rows_with_line_numbers(tmp_path):
    good = line()
    raw = "\n".join([good, line(cats=["ab\0cd"] * 26), good, "", good]).encode() + b"\n"
    raw += line(cats=["café"] * 26).encode("latin-1") + b"\n" + good.encode() + b"\nx\ry\n" + good.encode() + b"\r\n"
    (tmp_path / "mixed.tsv").write_bytes(raw)
    frame, lines, rejects = read(tmp_path / "mixed.tsv")
    assert lines.tolist() == [1, 3, 5, 7, 9] and len(frame) == 5
    assert {n: r for n, (r, _) in rejects.items()} == {
        2: "bad_encoding",
        4: "field_count",
        6: "bad_encoding",
        8: "bad_encoding",
    }
    assert "\\x00" in rejects[2][1] and "caf\\xe9" in rejects[6][1] and rejects[4][1] == ""
    assert frame["C26"].tolist() == [f"{25:08x}"] * 5  # the CRLF line lost its \r


def test_a_huge_line_is_one_reject_and_memory_stays_bounded(tmp_path):
    huge = line(cats=["y" * 300_000] + ["z"] * 25)
    (tmp_path / "huge.tsv").write_text("\n".join([line(), huge, line(), "1\t" + "q" * 500_000]) + "\n")
    frame, lines, rejects = read(tmp_path / "huge.tsv", block_bytes=1 << 16)
    assert lines.tolist() == [1, 3] and set(rejects) == {2, 4}
    assert {r for r, _ in rejects.values()} == {"line_too_long"}
    assert rejects[2][1].endswith(f"... ({len(huge)} bytes)") and len(rejects[2][1]) < 5000


def test_non_finite_dense_values_are_missing_in_ingest_and_in_serving(tmp_path):
    values = ["inf", "-inf", "nan", "NaN", "1e999", "7"]
    rows = [line(dense=[v] + ["1"] * 12) for v in values]
    (tmp_path / "inf.tsv").write_text("\n".join(rows) + "\n")
    ds = ingest(
        [tmp_path / "inf.tsv"], tmp_path / "ds", config=PreprocessConfig(table_size=50), split=SplitConfig(0, 0)
    )
    dense = np.asarray(ds.split("train").dense)
    np.testing.assert_allclose(dense[:, 0], [0, 0, 0, 0, 0, np.log1p(7)], rtol=1e-6)
    stats = json.loads((ds.path / "stats.json").read_text())
    assert stats["dense"]["I1"]["missing_rate"] == pytest.approx(5 / 6)
    pre = ds.preprocessor
    as_text = pd.DataFrame([r.split("\t") for r in rows], columns=list(CRITEO.columns))
    as_floats = as_text.assign(**{c: as_text[c].astype(float) for c in CRITEO.dense})
    for served in (as_text, as_floats):  # raw text (e.g. Triton string inputs) and floats
        np.testing.assert_array_equal(pre.transform(served).dense, dense)


def test_every_reject_reason_is_counted_in_the_manifest(tmp_path):
    rows = [line(), line(dense=["x"] + ["1"] * 12), line(label="2"), line(label=""), line(), "1\t2"]
    (tmp_path / "r.tsv").write_text("\n".join(rows) + "\n")
    ds = ingest([tmp_path / "r.tsv"], tmp_path / "ds", config=PreprocessConfig(table_size=50), split=SplitConfig(0, 0))
    assert ds.rejected == {"non_numeric_dense": 1, "bad_label": 2, "field_count": 1, "total": 4}


def test_an_unbalanced_quote_rejects_its_line_only(tmp_path):
    spec = ColumnSpec(label="click", dense=("price",), sparse=("user",), format="csv")
    (tmp_path / "q.csv").write_text('click,price,user\n1,2.5,"u1"\n0,1,"broken\n1,3,u3\n0,4,u4\n')
    frame, lines, rejects = read(tmp_path / "q.csv", spec)
    assert lines.tolist() == [2, 4, 5] and frame["user"].tolist() == ["u1", "u3", "u4"]
    assert rejects == {3: ("bad_quoting", '0,1,"broken')}


def test_line_numbers_hold_across_blocks(tmp_path):
    rows = [line(label=str(i % 2), cats=[f"{i:08x}"] * 26) if i % 97 else "bad\tline" for i in range(1, 3001)]
    (tmp_path / "many.tsv").write_text("\n".join(rows) + "\n")
    frame, lines, rejects = read(tmp_path / "many.tsv", block_bytes=10_000)
    expected = [i for i in range(1, 3001) if i % 97]
    assert lines.tolist() == expected and sorted(rejects) == [i for i in range(1, 3001) if not i % 97]
    assert frame["C1"].tolist() == [f"{i:08x}" for i in expected]


def test_transform_refuses_non_numeric_dense_text():
    pre = Preprocessor(ColumnSpec(dense=("a",), sparse=("c",)), PreprocessConfig(table_size=10))
    with pytest.raises(RecopsError, match=r"dense column a holds non-numbers at rows \[1\]"):
        pre.transform(pd.DataFrame({"a": ["1", "x"], "c": ["u", "v"]}))


# --- inputs as users publish them ------------------------------------------------------------------


def test_gzip_is_found_by_its_magic_bytes_and_reads_like_plain_text(tmp_path):
    text = "".join(line(label=str(i % 2), cats=[f"{i:08x}"] * 26) + "\n" for i in range(5000))
    (tmp_path / "plain.tsv").write_text(text)
    (tmp_path / "day_0").write_bytes(gzip.compress(text.encode()))  # no suffix
    plain, plain_lines, _ = read(tmp_path / "plain.tsv", block_bytes=50_000)
    packed, packed_lines, _ = read(tmp_path / "day_0", block_bytes=50_000)
    pd.testing.assert_frame_equal(plain, packed)
    np.testing.assert_array_equal(plain_lines, packed_lines)
    spec = ColumnSpec(label="click", dense=("price",), sparse=("user",), format="csv")
    (tmp_path / "x.csv.gz").write_bytes(gzip.compress(b"\xef\xbb\xbfclick,price,user\n1,2,u\n0,,v\n"))
    frame = read_frame(tmp_path / "x.csv.gz", spec)  # a UTF-8 byte-order mark before the header is dropped
    assert frame["click"].tolist() == [1, 0] and frame["user"].tolist() == ["u", "v"]
    assert frame["price"].isna().tolist() == [False, True]


def test_unlabelled_rows_read_for_scoring_and_refused_for_training(tmp_path):
    rows = [line()[2:] for _ in range(3)]  # the 39 feature fields
    (tmp_path / "day.tsv").write_text("\n".join(rows) + "\n")
    frame = read_frame(tmp_path / "day.tsv", require_label=False)
    assert len(frame) == 3 and list(frame.columns) == list(CRITEO.columns[1:])
    with pytest.raises(RecopsError, match=r"day\.tsv: no label column 'label'; .*first field"):
        read_frame(tmp_path / "day.tsv")
    (tmp_path / "both.tsv").write_text(line() + "\n")
    assert "label" not in read_frame(tmp_path / "both.tsv", require_label=False)
    spec = ColumnSpec(label="click", dense=("price",), sparse=("user",), format="csv")
    (tmp_path / "s.csv").write_text("user,price\nu1,3\n")
    assert read_frame(tmp_path / "s.csv", spec, require_label=False).to_dict("list") == {"price": [3.0], "user": ["u1"]}
    with pytest.raises(RecopsError, match=r"s\.csv: no label column 'click'; training data needs it as a header col"):
        ingest([tmp_path / "s.csv"], tmp_path / "ds", spec=spec)


def test_ratings_become_clicks_by_thresholds_and_the_middle_is_counted(tmp_path):
    spec = ColumnSpec(
        label="rating",
        dense=("age",),
        sparse=("user", "item"),
        format="csv",
        label_positive_min=4,
        label_negative_max=2,
    )
    (tmp_path / "r.csv").write_text("user,item,rating,age\nu1,i1,5,30\nu2,i1,3,20\nu1,i2,1,30\nu3,i3,4.5,\nu3,i1,,40\n")
    ds = ingest(
        [tmp_path / "r.csv"],
        tmp_path / "ds",
        spec=spec,
        config=PreprocessConfig(table_size=64),
        split=SplitConfig(0, 0),
    )
    assert np.asarray(ds.split("train").label).tolist() == [1.0, 0.0, 1.0]
    assert ds.rejected == {"label_between_thresholds": 1, "bad_label": 1, "total": 2}
    rejects = (ds.path / "rejects.tsv").read_text().splitlines()[1:]
    assert [r.split("\t")[1:3] for r in rejects] == [["3", "label_between_thresholds"], ["6", "bad_label"]]


@pytest.mark.parametrize(
    "thresholds, message",
    [
        ({"label_positive_min": 4}, "set both label_positive_min and label_negative_max"),
        ({"label_positive_min": 2, "label_negative_max": 4}, r"label_negative_max \(4\) must be below"),
        ({"label_positive_min": "4", "label_negative_max": 2}, "rating thresholds must be finite numbers"),
    ],
)
def test_rating_thresholds_are_validated(thresholds, message):
    with pytest.raises(RecopsError, match=message):
        ColumnSpec.from_dict({"label": "rating", **thresholds})


def test_passthrough_columns_are_carried_unvalidated(tmp_path):
    spec = ColumnSpec(label="click", dense=("price",), sparse=("user",), format="csv")
    (tmp_path / "ids.csv").write_text("request,click,price,user\nr-1,1,2,u\n,0,x,v\n007,1,3,\n")
    frame, lines, rejects = read(tmp_path / "ids.csv", spec, passthrough=["request", "user"])
    assert frame["request"].tolist() == ["r-1", "007"] and lines.tolist() == [2, 4]
    assert rejects[3][0] == "non_numeric_dense"
    with pytest.raises(RecopsError, match=r"ids\.csv: CSV header lacks the passthrough columns \['row_id'\]"):
        read_frame(tmp_path / "ids.csv", spec, passthrough=["row_id"])


# --- the hash: keyed, salted per feature, the documented function, the same for training and serving ------


def _reference_hash(value: bytes, seed: int) -> int:
    mask, golden = (1 << 64) - 1, 0x9E3779B97F4A7C15

    def fmix(x: int) -> int:
        x ^= x >> 33
        x = x * 0xFF51AFD7ED558CCD & mask
        x ^= x >> 33
        x = x * 0xC4CEB3F99AB8E2AD & mask
        return x ^ x >> 33

    words = [int.from_bytes(value[i : i + 8].ljust(8, b"\0"), "little") for i in range(0, max(len(value), 1), 8)]
    h = words[0] ^ seed ^ (len(value) * golden & mask)
    for j, w in enumerate(words[1:], start=1):
        h ^= fmix(w ^ (seed + j * golden & mask))
    return fmix(h)


def test_ids_are_the_documented_keyed_hash_salted_per_feature():
    from recops.training.hashing import feature_seed

    values = ["a", "abcdefgh", "abcdefghi", "é" * 7, "x" * 100, "0a1b2c3d", None, ""]
    size = 1 << 20

    def pre(key: str) -> Preprocessor:
        return Preprocessor(ColumnSpec(dense=(), sparse=("c1", "c2")), PreprocessConfig(table_size=size, hash_key=key))

    frame = pd.DataFrame({"c1": values, "c2": values})
    ids = pre("recops-hash-v001").transform(frame).sparse
    for j, feature in enumerate(("c1", "c2")):
        seed = int(feature_seed(feature, "recops-hash-v001"))
        expected = [
            1 + ((_reference_hash(v.encode(), seed) >> 32) * (size - 1) >> 32) if v else MISSING_ID for v in values
        ]
        assert ids[:, j].tolist() == expected
    assert (ids[:6, 0] != ids[:6, 1]).all()  # salted per feature
    assert (ids[:6] != pre("another-key-0001").transform(frame).sparse[:6]).all()  # keyed


def test_serving_frames_give_the_ids_ingest_wrote(synth_dir, tmp_path):
    small = tmp_path / "small.tsv"
    small.write_text("".join((synth_dir / "data.tsv").open().readlines()[:3000]))
    ds = ingest([small], tmp_path / "ds", config=PreprocessConfig(table_size=1000), split=SplitConfig(0, 0))
    raw = pd.read_csv(small, sep="\t", header=None, names=list(CRITEO.columns), dtype=str, keep_default_na=False)
    served = ds.preprocessor.transform(raw.replace("", None))  # plain Python objects, as a client sends
    np.testing.assert_array_equal(served.sparse, np.asarray(ds.split("train").sparse))
    np.testing.assert_array_equal(served.dense, np.asarray(ds.split("train").dense))
    assert (served.sparse == MISSING_ID).any() and (served.sparse > 0).any()


def test_a_config_saved_with_the_old_hash_is_refused():
    old = PreprocessConfig().to_dict()
    del old["hash_scheme"]
    with pytest.raises(RecopsError, match="re-run `recops data ingest` and retrain"):
        Preprocessor.from_dict({"spec": CRITEO.to_dict(), "config": old})


def test_vocabulary_mode_keeps_frequent_values_first_and_the_rest_is_oov(tmp_path):
    rows = [line(cats=[v] * 26) for v in ["b", "a", "b", "c", "a", "b", "d"]]
    (tmp_path / "v.tsv").write_text("\n".join(rows) + "\n")
    config = PreprocessConfig(table_size=10, min_frequency=2)
    ds = ingest([tmp_path / "v.tsv"], tmp_path / "ds", config=config, split=SplitConfig(0, 0))
    assert ds.preprocessor.vocabularies["C1"] == ["b", "a"]  # most frequent first
    assert np.asarray(ds.split("train").sparse)[:, 0].tolist() == [2, 3, 2, 1, 3, 2, 1]  # OOV = 1
