"""Sweep overhead: N trainings through Ray Tune versus back-to-back in one process.

Same dataset, same N settings (a grid over embedding_lr), same epochs and one torch thread per
training in every variant. The baseline, ``sequential``, calls ``recops.training.train.fit`` N times in this
process (imports paid once, before timing). ``ray_cN`` is ``recops.training.sweep.run_sweep`` with a FIFO
scheduler and ``max_concurrent_trials=N``, timed end to end: local Ray start, trials (one-worker trials
train in their Tune trial process, which Tune reuses from trial to trial, so torch/torchrec are imported once
per process), results, Ray shutdown. ``train_s`` is the time inside the trainings (first epoch start to last
epoch end, summed over trials), so ``wall_s - train_s`` is what the orchestration costs.

``python -m recops.bench.sweep_overhead [--trials 4] [--epochs 2] [--rows 20000] [--concurrency 1,2] [--quick]``
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from recops.bench.common import bench_parser, format_table, write_result
from recops.training.sweep_records import read_events

NAME = "sweep_overhead"
LEARNING_RATES = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4)
ARCH = {"embedding_dim": 8, "dense_arch": [32, 16], "over_arch": [32, 16]}


def make_dataset(root: Path, rows: int) -> Path:
    from recops.training.dataset import ingest
    from recops.training.spec import PreprocessConfig
    from recops.training.synth import SynthConfig, write

    write(SynthConfig(rows=rows, seed=7), root / "raw")
    return ingest([root / "raw" / "data.tsv"], root / "data", config=PreprocessConfig(table_size=2000)).path


def sequential(dataset: Path, rates: list[float], epochs: int, out: Path) -> dict[str, Any]:
    """The N trainings back to back in this process (world of one, like a 1-worker trial)."""
    from recops.training.config import ModelConfig, TrainConfig
    from recops.training.train import fit

    arch = ModelConfig.from_dict(ARCH)
    start = time.perf_counter()
    results = [
        fit(
            dataset,
            arch,
            TrainConfig(epochs=epochs, batch_size=512, embedding_lr=lr, threads=1, device="cpu"),
            out / f"run{i}",
            resume=False,
        )
        for i, lr in enumerate(rates)
    ]
    wall = time.perf_counter() - start
    return {"wall_s": wall, "train_s": wall, "best_auc": max(r.val_auc for r in results)}


def through_ray(
    dataset: Path, rates: list[float], epochs: int, concurrency: int, out: Path, address: str | None = None
) -> dict[str, Any]:
    """The same N trainings as a Ray Tune sweep, ``concurrency`` trials at a time, on a local Ray or the cluster at
    ``address``; ``nodes`` counts the trials that started on each node."""
    from recops.training.sweep import run_sweep
    from recops.training.sweep_config import SweepConfig

    config = SweepConfig.from_dict(
        {
            "name": f"bench-c{concurrency}",
            "dataset": str(dataset),
            "model": ARCH,
            "train": {"batch_size": 512},
            "search": {"embedding_lr": {"grid": rates}},
            "epochs": epochs,
            "num_samples": 1,
            "scheduler": "fifo",
            "max_concurrent_trials": concurrency,
            "max_failures": 0,
            "storage_path": str(out),
        },
        local=address is None,
    )
    start = time.perf_counter()
    result = run_sweep(config, address=address)
    wall = time.perf_counter() - start
    if result.status != "completed" or result.num_errors or len(result.trials) != len(rates):
        raise RuntimeError(f"sweep {result.experiment_dir} ended {result.status} with {result.num_errors} errors")
    train_s, nodes = 0.0, Counter()
    for trial in result.trials:
        events = read_events(result.experiment_dir / "trials" / trial.trial_id / "work")
        start_event = next(e for e in events if e["event"] == "start")
        train_s += events[-1]["time"] - start_event["time"]
        nodes[start_event["nodes"][0]["node_id"]] += 1
    return {"wall_s": wall, "train_s": train_s, "best_auc": result.best_metrics["auc"], "nodes": dict(nodes)}


def row(name: str, measured: dict[str, Any], trials: int, concurrency: int, base_s: float) -> dict[str, Any]:
    """One result row: times, the orchestration cost per trial and the ratio to ``base_s`` (back to back)."""
    return {
        "variant": name,
        "trials": trials,
        "max_concurrent": concurrency,
        "wall_s": round(measured["wall_s"], 2),
        "train_s": round(measured["train_s"], 2),
        "overhead_s_per_trial": round((measured["wall_s"] - measured["train_s"]) / trials, 2),
        "ratio_vs_sequential": round(measured["wall_s"] / base_s, 2),
        "best_auc": round(measured["best_auc"], 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--trials", type=int, default=4, help=f"trainings per variant (at most {len(LEARNING_RATES)})")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rows", type=int, default=20_000, help="synthetic rows (80%% train)")
    parser.add_argument("--concurrency", default="1,2", help="max concurrent trials to measure, comma-separated")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.epochs, args.rows = 2, 1, 6000
    rates = list(LEARNING_RATES[: args.trials])
    levels = [int(c) for c in args.concurrency.split(",")]
    import recops.training.train  # noqa: F401  - import torch/torchrec before any clock starts

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        work = Path(tmp)
        dataset = make_dataset(work, args.rows)
        measured = {"sequential": sequential(dataset, rates, args.epochs, work / "seq")}
        for c in levels:
            measured[f"ray_c{c}"] = through_ray(dataset, rates, args.epochs, c, work / "sweeps")
    base = measured["sequential"]["wall_s"]
    rows = [
        row(name, m, args.trials, 1 if name == "sequential" else int(name[5:]), base) for name, m in measured.items()
    ]
    path = write_result(
        NAME,
        rows,
        args.results_dir,
        baseline="sequential",
        plots=[
            {
                "kind": "bar",
                "x": "variant",
                "y": ["train_s", "wall_s"],
                "title": f"{args.trials} trainings: time training vs wall time (s)",
            }
        ],
        config={"trials": args.trials, "epochs": args.epochs, "rows": args.rows, "threads_per_training": 1},
    )
    print(format_table(rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
