"""The local and Ray engines: a big file read in line-aligned ranges is read exactly as a whole (line numbers, rejects),
and `recops data ingest` / `recops score` give the same dataset and the same scores with `--engine local` and
`--engine ray` (2 workers on a local Ray the command starts, or on a running Ray it attaches to with --address),
each test checking that no Ray process is left behind."""

from __future__ import annotations

import filecmp
import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from recops.training.engine import Engine, EngineConfig
from recops.training.pieces import Piece, plan
from recops.training.readers import read_chunks
from recops.training.spec import ColumnSpec
from tests.conftest import recops
from tests.model_fixtures import trained_checkpoint
from tests.ray_fixtures import ray_env  # noqa: F401 (a fixture)

RANGE_MB = "0.0625"  # 64 KiB ranges: the test files are cut into several pieces


def out_json(proc) -> dict:
    return json.loads(proc.stdout.splitlines()[-1])


def with_bad_rows(source: Path, target: Path, every: int = 97, count: int | None = None) -> Path:
    """``source``'s first ``count`` lines with a field-count error, an empty line and a bad label spread through."""
    lines = source.read_text().splitlines(keepends=True)[:count]
    for i in range(3, len(lines), every):
        lines[i] = ("1\t2\t3\n", "\n", "7" + lines[i][1:])[i % 3]
    target.write_text("".join(lines))
    return target


def read_all(pieces, spec: ColumnSpec, **kw) -> tuple[pd.DataFrame, list[int], list[tuple[int, str, str]]]:
    chunks = [c for p in pieces for c in read_chunks(p.path, spec, 8 << 10, span=p.span, **kw)]
    frame = pd.concat([c.frame for c in chunks if len(c.frame)], ignore_index=True)
    return frame, [int(n) for c in chunks for n in c.lines], [r for c in chunks for r in c.rejects]


@pytest.mark.parametrize("kind", ["criteo", "csv"])
def test_a_file_read_in_ranges_is_read_as_a_whole(synth_dir, tmp_path, kind) -> None:
    if kind == "criteo":
        spec, path = ColumnSpec.criteo(), with_bad_rows(synth_dir / "data.tsv", tmp_path / "rows.tsv", 41, 3000)
    else:
        spec = ColumnSpec(label="click", dense=("price",), sparse=("user",), format="csv")
        rows = [f"{i % 2},{i * 0.5},u{i % 7}" for i in range(20_000)]
        rows[500], rows[4321], rows[9000] = "1,x,u1", "1,2", '1,3,"open'  # non-numeric, field count, quoting
        path = tmp_path / "rows.csv"
        path.write_bytes(b"\xef\xbb\xbf" + ("click,price,user\r\n" + "\r\n".join(rows) + "\r\n").encode())
    with Engine(EngineConfig(range_bytes=64 << 10)) as engine:
        pieces = plan([path], spec, engine)
    data = path.read_bytes()
    assert len(pieces) >= 3 and all(data[p.span.start - 1 : p.span.start] == b"\n" for p in pieces[1:])
    assert [p.span.first_line for p in pieces] == [1 + data[: p.span.start].count(b"\n") for p in pieces]
    whole = [Piece(path, 0)]
    ranged, ranged_lines, ranged_rejects = read_all(pieces, spec)
    frame, lines, rejects = read_all(whole, spec)
    pd.testing.assert_frame_equal(ranged, frame)
    assert ranged_lines == lines and ranged_rejects == rejects and len(rejects) >= 3
    assert lines[:3] == ([1, 2, 3] if kind == "criteo" else [2, 3, 4])


def ingest_cli(inputs: list[Path], out: Path, *engine: str) -> dict:
    args = ["data", "ingest", "--input", *map(str, inputs), "--out", str(out), "--table-size", "5000"]
    return out_json(recops(*args, "--min-frequency", "2", *engine, "--json", timeout=400))


def test_ingest_with_ray_gives_the_local_dataset(synth_dir, tmp_path, ray_env) -> None:  # noqa: F811
    big = with_bad_rows(synth_dir / "data.tsv", tmp_path / "big.tsv")  # ~5 MB: ~75 ranges
    small = tmp_path / "small.tsv.gz"
    small.write_bytes(gzip.compress(b"".join((synth_dir / "data.tsv").read_bytes().splitlines(True)[:3000])))
    local = ingest_cli([big, small], tmp_path / "local")
    ray = ingest_cli([big, small], tmp_path / "ray", "--engine", "ray", "--workers", "2", "--range-mb", RANGE_MB)
    assert ray["version"] == local["version"] and ray["rows"] == local["rows"] and local["rejected"]["total"] > 100
    a, b = Path(local["path"]), Path(ray["path"])
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (a, b)]
    engines = [m.pop("engine") for m in manifests]
    assert engines[0]["name"] == "local" and engines[0]["pieces"] == 2
    assert engines[1]["name"] == "ray" and engines[1]["workers"] == 2 and engines[1]["pieces"] > 20
    assert len(engines[1]["worker_peak_rss_mib"]) >= 2 and 0 < max(engines[1]["worker_peak_rss_mib"]) < 2000
    assert [{k: v for k, v in m.items() if k != "created"} for m in manifests][0] == {
        k: v for k, v in manifests[1].items() if k != "created"
    }
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert {"rejects.tsv", "stats.json", "train/sparse.npy", "test/dense.npy"} <= {str(f) for f in files}
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert [f for f in files if not filecmp.cmp(a / f, b / f, shallow=False)] == []
    vocabulary = json.loads((a / "preprocessor.json").read_text())["vocabularies"]
    assert (
        sum(map(len, vocabulary.values())) > 500
    )  # --min-frequency: vocabularies from counts merged across the pieces

    mismatch = tmp_path / "three.tsv"
    mismatch.write_text("1\t2\t3\n" * 10)
    failed = recops(
        "data", "ingest", "--input", str(mismatch), "--out", str(tmp_path / "x"), "--engine", "ray", check=False
    )
    assert failed.returncode == 2 and failed.stderr.strip().splitlines()[-1] == (
        "recops data: error: input " + str(mismatch) + ": schema mismatch: no row has the expected 40 fields "
        "(label, I1, I2, ...); is this criteo data matching the column spec (--spec)?"
    )  # raised in a Ray task, reported as itself


def test_score_on_a_ray_cluster_writes_the_local_scores_as_shards(
    synth_dir,
    tiny_dataset,
    tmp_path_factory,
    tmp_path,
    ray_env,  # noqa: F811
) -> None:
    import ray

    checkpoint = trained_checkpoint(tiny_dataset.path, "dlrm", tmp_path_factory)
    rows = with_bad_rows(synth_dir / "data.tsv", tmp_path / "rows.tsv")
    common = ["score", "--checkpoint", str(checkpoint), "--input", str(rows), "--json"]
    local = out_json(recops(*common, "--output", str(tmp_path / "local.parquet"), timeout=400))
    local_dir = out_json(recops(*common, "--output", str(tmp_path / "local"), timeout=400))  # one shard per file
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")  # "a cluster"
    try:
        address = ray.get_runtime_context().gcs_address
        engine = ["--engine", "ray", "--address", address, "--range-mb", RANGE_MB]
        too_many = recops(*common, "--output", str(tmp_path / "x"), *engine, "--workers", "3", check=False)
        clustered = out_json(recops(*common, "--output", str(tmp_path / "shards"), *engine, timeout=400))
    finally:
        ray.shutdown()
    assert too_many.returncode == 2 and f"--workers 3: the Ray cluster at {address} has 2 CPUs" in too_many.stderr
    shards = sorted((tmp_path / "shards").iterdir())
    assert [s.name for s in shards] == [f"part-{i:05d}.parquet" for i in range(clustered["shards"])]
    assert len(shards) > 20 and clustered["engine"]["workers"] == 2 and local_dir["shards"] == 1
    assert (clustered["rows_scored"], clustered["rejected"]) == (local["rows_scored"], local["rejected"])
    assert local["rows_rejected"] > 100
    expected = pq.read_table(tmp_path / "local.parquet").to_pandas()
    got = pd.concat([pq.read_table(s).to_pandas() for s in shards], ignore_index=True)
    pd.testing.assert_frame_equal(got, expected)
    pd.testing.assert_frame_equal(pq.read_table(tmp_path / "local" / "part-00000.parquet").to_pandas(), expected)
    assert np.all(np.diff(got["line"]) > 0) and got["score"].between(0, 1).all()
    assert (tmp_path / "shards.rejects.tsv").read_text() == (tmp_path / "local.parquet.rejects.tsv").read_text()


def test_engine_flags_are_checked_before_any_work(tmp_path) -> None:
    rows = tmp_path / "rows.tsv"
    rows.write_text("1\t2\n")
    ingest = ["data", "ingest", "--input", str(rows), "--out", str(tmp_path / "ds")]
    failed = recops(*ingest, "--workers", "2", check=False)
    assert failed.returncode == 2 and "--address and --workers run the work on Ray: add --engine ray" in failed.stderr
    failed = recops(*ingest, "--engine", "ray", "--range-mb", "0.01", check=False)
    assert failed.returncode == 2 and "pass at least 65536 (64 KiB)" in failed.stderr
    score = ["score", "--checkpoint", str(tmp_path), "--input", str(rows), "--engine", "ray"]
    failed = recops(*score, "--output", str(tmp_path / "scores.parquet"), check=False)
    assert failed.returncode == 2 and "--engine ray writes Parquet shards: pass a directory" in failed.stderr
    assert not (tmp_path / "ds").exists() and not (tmp_path / "scores.parquet").exists()
