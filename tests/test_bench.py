"""Benchmarks: the plain-PyTorch DLRM computes what TorchRec's does, the shared helpers, the suite and
report on a real quick run, failures and missing scripts reported, and the GPU check's plan."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import zipfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import torch

from recops.bench.common import format_table, hardware, measure, portable, read_result, write_result
from recops.bench.dlrm_variants import EmbeddingBagDLRM, build_variant, run_variant, synthetic_batches
from recops.bench.quality_real import GENRES, SPEC, ratings_table, read_published, read_wheel
from recops.bench.report import render
from recops.bench.serve_latency import add_ratios, aims
from recops.bench.suite import Benchmark, run_one, run_suite
from recops.bench.train_throughput import PRESETS, VARIANTS, ThroughputConfig
from recops.errors import RecopsError
from recops.training.config import ModelConfig
from recops.training.model import DLRM, to_kjt
from tests.conftest import ROOT, recops


def test_plain_embedding_bag_dlrm_equals_torchrec_dlrm():
    tables = {"C1": 50, "C2": 7, "C3": 300}
    config = ModelConfig(tables=tables, num_dense=13, embedding_dim=4, dense_arch=(8,), over_arch=(8,))
    torch.manual_seed(0)
    ref, plain = DLRM(config), EmbeddingBagDLRM(config, sparse_grad=True)
    for i, name in enumerate(tables):
        plain.bags[i].weight.data.copy_(ref.ebc.embedding_bags[f"t_{name}"].weight)
    plain.head.load_state_dict(ref.head.state_dict())
    ids = torch.stack([torch.randint(0, n, (32,)) for n in tables.values()], dim=1)
    dense = torch.randn(32, 13)
    out_ref, out_plain = ref(dense, to_kjt(list(tables), ids)), plain(dense, ids)
    torch.testing.assert_close(out_plain, out_ref)
    out_ref.sum().backward()
    out_plain.sum().backward()
    for i, name in enumerate(tables):
        grad = plain.bags[i].weight.grad
        assert grad.is_sparse
        torch.testing.assert_close(grad.to_dense(), ref.ebc.embedding_bags[f"t_{name}"].weight.grad)


@pytest.mark.parametrize("variant,path", [("torchrec", "unsharded"), ("plain_sparse", "auto"), ("plain_dense", "auto")])
def test_variant_steps_fit_a_batch(variant, path):
    # (the DMP paths train in test_quick_suite_run_writes_results_and_report, in their own processes)
    cfg = ThroughputConfig(max_rows=500, embedding_dim=4, dense_arch=(8,), over_arch=(8,), torchrec_path=path)
    bind, description = build_variant(variant, cfg)
    batches = synthetic_batches(cfg, 256, count=1, pin=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only spin on a busy host
    try:
        with ExitStack() as stack:
            step = bind(batches, stack)
            losses = [float(step()) for _ in range(20)]
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < 0.9 * losses[0], losses
    assert ("EmbeddingBagCollection" in description) == (variant == "torchrec")


def test_two_rank_variants_measure_whole_batches_over_both_ranks():
    cfg = ThroughputConfig(
        batch_sizes=(64,), max_rows=500, embedding_dim=4, dense_arch=(8,), over_arch=(8,), min_seconds=0.05, threads=2
    )
    result = run_variant("torchrec_pipeline", cfg, nproc=2)
    assert result["nproc"] == 2 and result["threads"] == 1 and "world=2" in result["path"]
    assert "TrainPipelineSparseDist" in result["path"]
    (point,) = result["points"]
    assert point["batch_size"] == 64 and point["steps"] >= 1 and min(point["samples_per_s"]) > 0
    with pytest.raises(RecopsError, match="plain_sparse runs in one process"):
        run_variant("plain_sparse", cfg, nproc=2)


def test_uniform_ids_fill_the_reference_tables():
    cfg = ThroughputConfig(**PRESETS["reference"])
    assert cfg.tables() == {f"C{i}": 100_000 for i in range(1, 27)}
    ((dense, ids, label),) = synthetic_batches(cfg, 4096, count=1, pin=False)
    assert ids.shape == (4096, 26) and ids.min() >= 0 and ids.max() < 100_000
    assert np.bincount(ids[:, 0].numpy()).max() <= 4  # no hot ids: uniform over 100k rows
    model = cfg.model_config()
    assert (model.embedding_dim, model.dense_arch, model.over_arch) == (16, (512, 256, 64), (512, 256))


def test_synthetic_batches_are_skewed_ids_inside_each_table():
    cfg = ThroughputConfig(max_rows=5000)
    ((dense, ids, label),) = synthetic_batches(cfg, 4096, count=1, pin=False)
    rows = np.array(list(cfg.tables().values()))
    assert dense.shape == (4096, 13) and ids.shape == (4096, 26) and label.shape == (4096,)
    assert (ids.numpy() >= 0).all() and (ids.numpy() < rows).all()
    big = int(np.argmax(rows))  # a 5000-row table: the hottest id takes far more than 1/5000 of the lookups
    assert np.bincount(ids[:, big].numpy()).max() > 0.1 * 4096


def test_measure_excludes_warmup_and_reports_the_median():
    calls = []
    timing = measure(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and len(timing.times_s) == 3
    assert timing.min_s <= timing.median_s


def cell(backend: str, batch: int, conc: int, p50: float, rate: float) -> dict:
    return {"backend": backend, "batch_size": batch, "concurrency": conc, "p50_ms": p50, "rows_per_s": rate}


def test_serving_rows_are_ratios_against_onnxruntime_at_the_same_batch_and_concurrency():
    rows = [
        cell("onnxruntime", 1, 1, 0.02, 40_000),
        cell("triton_http", 1, 1, 0.7, 1_400),
        cell("onnxruntime", 1, 4, 0.05, 60_000),
        cell("triton_http", 1, 4, 1.5, 2_400),
        cell("triton_grpc", 8, 1, 0.8, 9_000),
    ]
    add_ratios(rows)
    assert [r["variant"] for r in rows] == [
        "onnxruntime c1",
        "triton_http c1",
        "onnxruntime c4",
        "triton_http c4",
        "triton_grpc c1",
    ]
    assert rows[1]["p50_vs_onnxruntime"] == pytest.approx(35) and rows[1]["rows_per_s_vs_onnxruntime"] == pytest.approx(
        0.035
    )
    assert rows[3]["p50_vs_onnxruntime"] == pytest.approx(30) and rows[2]["p50_vs_onnxruntime"] == 1.0
    assert rows[4]["p50_vs_onnxruntime"] is None  # no baseline cell at batch 8: no ratio rather than a wrong one


def test_raw_row_cells_are_also_ratios_against_the_tensor_model_and_in_process_preprocessing():
    rows = [
        cell("onnxruntime", 1, 1, 0.02, 40_000),
        cell("triton_http", 1, 1, 0.7, 1_400),
        cell("preprocess_onnxruntime", 1, 1, 2.0, 500),
        cell("triton_raw_http", 1, 1, 3.0, 330),
        cell("triton_raw_grpc", 1, 1, 3.2, 310),
        cell("triton_http", 1024, 1, 50.0, 20_000),
        cell("triton_raw_http", 1024, 1, 60.0, 17_000),
    ]
    goals = aims(rows)
    add_ratios(rows)
    raw = rows[3]
    assert raw["p50_vs_tensor"] == pytest.approx(3.0 / 0.7) and raw["extra_p50_ms_vs_tensor"] == pytest.approx(2.3)
    assert raw["rows_per_s_vs_preprocess_onnxruntime"] == pytest.approx(0.66) and raw["p50_vs_onnxruntime"] == 150
    assert rows[4]["p50_vs_tensor"] is None and rows[4]["p50_vs_preprocess_onnxruntime"] == pytest.approx(1.6)
    assert "p50_vs_tensor" not in rows[1]  # tensor cells are compared with onnxruntime only
    assert goals["triton_raw_http_extra_p50_ms_batch1"] == {
        "value": 2.3,
        "over": "triton_http",
        "aim": "<= 0.3",
        "met": False,
    }
    assert goals["triton_raw_http_throughput_share_batch1024_c1"]["value"] == 0.85
    assert goals["triton_raw_http_throughput_share_batch1024_c1"]["met"]


def test_write_result_labels_hardware_and_date(tmp_path):
    path = write_result("demo", [{"x": 1, "y": 2.5}], tmp_path, baseline="b", config={"k": 1})
    data = read_result("demo", tmp_path)
    assert path == tmp_path / "demo.json" and [p.name for p in tmp_path.iterdir()] == ["demo.json"]
    assert data["hardware"]["label"] == hardware()["label"] and data["date"].startswith(time.strftime("%Y"))
    assert data["rows"] == [{"x": 1, "y": 2.5}] and data["baseline"] == "b" and data["config"] == {"k": 1}
    assert format_table(data["rows"]).splitlines()[0].split() == ["x", "y"]


def test_quick_suite_run_writes_results_and_report(tmp_path):
    proc = recops("bench", "--quick", "--only", "train_throughput", "--results-dir", str(tmp_path), "--json")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["benchmarks"] == {"train_throughput": "ok"}
    result = read_result("train_throughput", tmp_path)
    assert {(r["variant"], r["batch_size"]) for r in result["rows"]} == {(v, b) for v in VARIANTS for b in (64, 256)}
    assert all(r["samples_per_s"] > 0 and r["peak_rss_mib"] > 0 for r in result["rows"])
    assert all(r["ratio_vs_plain_sparse"] > 0 for r in result["rows"] if r["variant"] == "torchrec")
    assert "DistributedModelParallel" in result["variants"]["torchrec"] and result["errors"] == {}
    assert "TrainPipelineSparseDist" in result["variants"]["torchrec_pipeline"]
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert [r["status"] for r in suite["runs"]] == ["ok"] and "available" in suite["runs"][0]["gpu"]
    report = (tmp_path / "REPORT.md").read_text()
    assert (
        "## train_throughput — ok" in report
        and "![DLRM training throughput (samples/s)](train_throughput_0.png)" in report
    )
    assert (tmp_path / "train_throughput_0.png").stat().st_size > 0
    assert (tmp_path / "gpu_utilisation.png").is_file() == bool(hardware()["gpus"])  # no GPU: a sentence instead
    assert report.count("NOT RUN") >= 1  # the benchmarks this run left out are listed, not dropped
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()


def test_failed_missing_and_gpu_only_benchmarks_are_reported(tmp_path):
    t0 = time.time()
    failed, _ = run_one(Benchmark("train_throughput", quick=("--variants", "nope")), tmp_path, True, [], t0)
    missing, _ = run_one(Benchmark("no_such_benchmark"), tmp_path, True, [], t0)
    assert (failed.status, failed.exit_code) == ("failed", 2) and "unknown variants" in failed.log_tail
    assert missing.status == "missing" and "does not exist" in missing.detail
    if not hardware()["gpus"]:
        skipped, _ = run_one(Benchmark("onnx_gpu", gpu_only=True), tmp_path, True, [], t0)
        assert skipped.status == "skipped"
    suite = run_suite([Benchmark("no_such_benchmark")], tmp_path, quick=True, echo=False)
    report = (tmp_path / "REPORT.md").read_text()
    assert (
        suite["runs"][0]["status"] == "missing" and "**MISSING**: bench/no_such_benchmark.py does not exist" in report
    )
    assert "no GPU" in report or hardware()["gpus"]
    assert render(tmp_path)["html"].exists()


def test_recops_bench_rejects_unknown_names():
    proc = recops("bench", "--only", "nope", check=False)
    assert proc.returncode == 2 and "unknown benchmark" in proc.stderr


def test_gpu_check_script_plan(tmp_path):
    for script in ("bench/gpu_check.sh", "bench/prepare_gpu_wheels.sh"):
        subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OUT": str(tmp_path)},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    plan = proc.stdout
    for step in ("nvidia-smi", "pip install", "pytest -m gpu", "--device cuda", "65536", "onnx_gpu"):
        assert step in plan, step
    assert len(list(tmp_path.rglob("*"))) <= 8


def test_bar_plots_the_benchmarks_own_figure_and_no_empty_gpu_figure(tmp_path):
    rows = [
        {"pair": p, "tool": t, "report_s": s}
        for p in ("none", "strong")
        for t, s in (("recops", 0.5), ("evidently", 200.0))
    ]
    spec = {"kind": "bar", "x": "pair", "y": "report_s", "series": "tool", "log_y": True, "title": "drift s"}
    write_result("drift", rows, tmp_path, baseline="evidently", plots=[spec])
    (tmp_path / "drift.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # the script's own figure
    render(tmp_path)
    report = (tmp_path / "REPORT.md").read_text()
    assert "![drift s](drift_0.png)" in report and "![drift (drawn by bench/drift.py)](drift.png)" in report
    assert (tmp_path / "drift_0.png").stat().st_size > 0
    assert "No GPU utilisation: no suite.json here" in report and not (tmp_path / "gpu_utilisation.png").exists()


def test_results_and_reports_carry_no_local_paths(tmp_path):
    assert portable(f"{Path.cwd()}/bench/results") == "bench/results"
    assert portable({"log": f"{sys.prefix}/lib/x.py: warning"}) == {"log": "<venv>/lib/x.py: warning"}
    write_result("paths", [{"file": str(ROOT / "bench" / "x.py")}], tmp_path)
    assert read_result("paths", tmp_path)["rows"] == [{"file": "bench/x.py"}]
    for path in (ROOT / "bench" / "results").iterdir():
        if path.suffix in (".json", ".md", ".html"):
            text = path.read_text()
            assert str(ROOT) not in text and not re.search(r"[\"`( ]/(work|home|root|tmp|Users)/", text), path.name


def _ml100k(tmp_path: Path) -> tuple[Path, Path]:
    """Three ratings as GroupLens publishes them and as the recbole wheel ships them (its year: the title's)."""
    ratings = [("196", "242", "3", "881250949"), ("22", "377", "1", "878887116"), ("196", "267", "5", "891717742")]
    users = [("196", "49", "M", "writer", "55105"), ("22", "25", "M", "writer", "40206")]
    items = [  # id, title, u.item's release date, the wheel's year, genres
        ("242", "Kolya (1996)", "24-Jan-1997", "1996", ["Comedy"]),
        ("377", "Heavyweights (1994)", "01-Jan-1994", "1994", ["Children's", "Comedy"]),
        ("267", "unknown", "", "unkonwn", ["unknown"]),
    ]
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    lines = lambda rows, sep: "".join(sep.join(r) + "\n" for r in rows)  # noqa: E731
    (folder / "u.data").write_text(lines(ratings, "\t"))
    (folder / "u.user").write_text(lines(users, "|"))
    flags = [["1" if g in genres else "0" for g in GENRES] for *_, genres in items]
    u_item = [(i, t, d, "", "http://x", *f) for (i, t, d, _, _), f in zip(items, flags)]
    (folder / "u.item").write_text(lines(u_item, "|"))
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    base = "recbole/dataset_example/ml-100k/ml-100k"
    tables = {
        "inter": (("user_id:token", "item_id:token", "rating:float", "timestamp:float"), ratings),
        "user": (("user_id:token", "age:token", "gender:token", "occupation:token", "zip_code:token"), users),
        "item": (
            ("item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"),
            [(i, t, y, " ".join(g)) for i, t, _, y, g in items],
        ),
    }
    with zipfile.ZipFile(wheel, "w") as zf:
        for kind, (header, rows) in tables.items():
            zf.writestr(f"{base}.{kind}", lines([header, *rows], "\t"))
    return folder, wheel


def test_ml100k_from_the_published_folder_or_the_wheel_is_one_csv(tmp_path):
    folder, wheel = _ml100k(tmp_path)
    published, packaged = ratings_table(*read_published(folder)), ratings_table(*read_wheel(wheel))
    assert published.astype(str).equals(packaged.astype(str))
    first = published.iloc[0]
    # the year in the title, as the wheel has it (u.item dates Kolya (1996) 24-Jan-1997)
    assert (first["zip3"], first["release_year"], first["hour"], first["weekday"]) == ("551", 1996, 15, 3)
    assert published["genres"].tolist() == ["Comedy", "Children's|Comedy", "unknown"]
    assert published["release_year"].isna().tolist() == [False, False, True]  # unknown: missing, not a reject
    assert "label_positive_min: 4" in SPEC and "multi_hot: {genres: 6}" in SPEC
