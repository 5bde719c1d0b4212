"""DLRM training throughput: TorchRec (fused in-backward optimizer under DMP) vs plain-PyTorch EmbeddingBags.

Variants, all with the same head (``recops.training.model.DLRMHead``), the same synthetic batches (26 tables,
Zipf-distributed or uniform ids) and the same optimizers (embeddings: Adagrad or SGD; MLPs: Adam):

- ``torchrec``: ``recops.training.model.DLRMTrain`` (an ``EmbeddingBagCollection`` fed a KJT) built by
  ``recops.training.train.build_model``: DMP, the embedding optimizer fused into the backward. One step after
  the other, the KJT built inside the step: how ``training/train.py`` trained before the input pipeline. On CUDA
  without fbgemm-gpu's CUDA kernels this becomes the unsharded EBC with a regular optimizer (``path`` in the JSON
  says which ran).
- ``torchrec_pipeline``: the same model as ``training/train.py`` trains it now: a ``BatchLoader`` thread gathers the
  rows and builds each KJT ahead, TorchRec's ``TrainPipelineSparseDist`` distributes the next batches' ids while
  the current one computes.
- ``plain_sparse`` (the baseline): one ``nn.EmbeddingBag(mode="sum", sparse=True)`` per table and a
  sparse-gradient optimizer, as the reference DLRM implementation (facebookresearch/dlrm) does.
- ``plain_dense``: the same bags with dense gradients and a dense optimizer.

``--nproc 1,2`` also runs the TorchRec variants on 2 gloo ranks (``<variant>_2ranks``; the cores split between
them, each rank taking its share of every batch); the plain variants always run in one process on every core.
``--preset reference`` is the reference DLRM's shape (26 x 100k tables, dim 16, MLPs 13-512-256-64-16 and
367-512-256-1, uniform random ids, SGD embeddings). Each variant runs in its own process(es) (its peak RSS is its
own, summed over ranks); rounds interleave the variants so a busy machine slows them alike; the median over rounds
is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from recops.bench.common import bench_parser, format_table, run_json_subprocess, run_main, write_result
from recops.errors import RecopsError

NAME = "train_throughput"
# Criteo Kaggle (Display Advertising Challenge) cardinalities of C1..C26.
CRITEO_KAGGLE_ROWS = (
    1460,
    583,
    10131227,
    2202608,
    305,
    24,
    12517,
    633,
    3,
    93145,
    5683,
    8351593,
    3194,
    27,
    14992,
    5461306,
    10,
    5652,
    2173,
    4,
    7046547,
    18,
    15,
    286181,
    105,
    142572,
)
VARIANTS = ("torchrec", "torchrec_pipeline", "plain_sparse", "plain_dense")
SHARDED = ("torchrec", "torchrec_pipeline")  # the variants that run on several ranks with --nproc
BASELINE = "plain_sparse"
PRESETS = {  # the reference DLRM (facebookresearch/dlrm, its Criteo-shaped random-data benchmark)
    "reference": {
        "table_rows": 100_000,
        "embedding_dim": 16,
        "dense_arch": (512, 256, 64),
        "over_arch": (512, 256),
        "zipf_a": 0.0,
        "embedding_optimizer": "sgd",
    }
}
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}  # PASSIVE: no spinning threads on a shared host


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


@dataclass(frozen=True)
class ThroughputConfig:
    """Model shape, data and measurement settings of one run."""

    batch_sizes: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    embedding_dim: int = 16  # dim and arches: recops' default architecture (recops.training.model.ModelConfig)
    max_rows: int = 1_000_000  # cap on each table's Criteo cardinality (0 = full size)
    table_rows: int = 0  # > 0: every table has this many rows instead of the (capped) Criteo cardinalities
    dense_arch: tuple[int, ...] = (64, 32)
    over_arch: tuple[int, ...] = (128, 64)
    embedding_optimizer: str = "adagrad"
    embedding_lr: float = 0.05
    dense_lr: float = 1e-3
    zipf_a: float = 1.2  # 0 = uniform random ids
    warmup_steps: int = 2
    min_seconds: float = 1.0  # each timed repeat runs at least this long
    repeats: int = 1  # timed repeats per batch size inside one process
    rounds: int = 3  # processes per variant, interleaved across variants
    device: str = "cpu"
    threads: int = 0
    tf32: bool = True  # CUDA only: TF32 matmuls
    torchrec_path: str = "auto"  # dmp | unsharded | auto (unsharded on CUDA without fbgemm-gpu's CUDA kernels)
    nprocs: tuple[int, ...] = (1,)  # rank counts the TorchRec variants run with
    seed: int = 0

    def __post_init__(self) -> None:
        if self.torchrec_path not in ("auto", "dmp", "unsharded"):
            raise RecopsError(f"train_throughput: torchrec_path {self.torchrec_path!r} is not auto, dmp or unsharded")
        if not self.batch_sizes or min(self.batch_sizes) < 1 or self.rounds < 1 or self.repeats < 1:
            raise RecopsError("train_throughput: batch sizes, rounds and repeats must be >= 1")
        if not self.nprocs or min(self.nprocs) < 1 or any(b % n for b in self.batch_sizes for n in self.nprocs):
            raise RecopsError("train_throughput: --nproc counts must be >= 1 and divide every batch size")

    def tables(self) -> dict[str, int]:
        if self.table_rows:
            return {f"C{i + 1}": self.table_rows for i in range(len(CRITEO_KAGGLE_ROWS))}
        return {
            f"C{i + 1}": min(rows, self.max_rows) if self.max_rows else rows
            for i, rows in enumerate(CRITEO_KAGGLE_ROWS)
        }

    def model_config(self):
        from recops.training.config import ModelConfig

        return ModelConfig(
            tables=self.tables(),
            num_dense=13,
            embedding_dim=self.embedding_dim,
            dense_arch=self.dense_arch,
            over_arch=self.over_arch,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ThroughputConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def summarize(runs: dict[str, list[dict[str, Any]]], cfg: ThroughputConfig) -> list[dict[str, Any]]:
    """One row per (variant, batch size): median samples/s over rounds, peak RSS, ratios vs the baselines."""
    rates: dict[tuple[str, int], list[float]] = {}
    cpu_rates: dict[tuple[str, int], list[float]] = {}
    for variant, results in runs.items():
        for result in results:
            for p in result["points"]:
                rates.setdefault((variant, p["batch_size"]), []).extend(p["samples_per_s"])
                cpu_rates.setdefault((variant, p["batch_size"]), []).append(p["samples_per_cpu_s"])
    rows = []
    for variant, results in runs.items():
        if not results:
            continue
        for bs in cfg.batch_sizes:
            values = rates.get((variant, bs), [])
            if not values:
                continue
            med = statistics.median(values)
            row = {
                "variant": variant,
                "batch_size": bs,
                "samples_per_s": med,
                "samples_per_s_min": min(values),
                "samples_per_s_max": max(values),
                "measurements": len(values),
                "samples_per_cpu_s": statistics.median(cpu_rates[(variant, bs)]),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
            }
            if "peak_gpu_mib" in results[0]:
                row["peak_gpu_mib"] = max(r["peak_gpu_mib"] for r in results)
            for base in ("plain_sparse", "plain_dense"):
                if rates.get((base, bs)):
                    row[f"ratio_vs_{base}"] = med / statistics.median(rates[(base, bs)])
            rows.append(row)
    return rows


def pivot_table(rows: list[dict[str, Any]]) -> str:
    """samples/s per batch size and variant, with the TorchRec variants' ratios against (b)."""
    labels = list(dict.fromkeys(r["variant"] for r in rows))
    table = []
    for bs in sorted({r["batch_size"] for r in rows}):
        at = {r["variant"]: r for r in rows if r["batch_size"] == bs}
        line: dict[str, Any] = {"batch": bs}
        line.update({f"{v} /s": at[v]["samples_per_s"] if v in at else None for v in labels})
        line.update({f"{v}/(b)": at.get(v, {}).get("ratio_vs_plain_sparse") for v in labels if v.startswith("torch")})
        table.append(line)
    rss = {"batch": "peak RSS MiB"}
    rss.update({f"{v} /s": next(r["peak_rss_mib"] for r in rows if r["variant"] == v) for v in labels})
    return format_table([*table, rss])


def label(variant: str, nproc: int) -> str:
    """How a variant run on ``nproc`` ranks is named in the results."""
    return variant if nproc == 1 else f"{variant}_{nproc}ranks"


def _measure_variant(cfg: ThroughputConfig, variant: str, nproc: int, timeout_s: float) -> dict[str, Any]:
    config = json.dumps(cfg.to_dict())
    args = ["-m", "recops.bench.dlrm_variants", "--variant", variant, "--config-json", config, "--nproc", str(nproc)]
    return run_json_subprocess(args, timeout_s, env=WORKER_ENV)


def run_all(
    cfg: ThroughputConfig, variants: tuple[str, ...], timeout_s: float, concurrent: bool = False
) -> tuple[dict[str, list], dict[str, str]]:
    """Every variant (the TorchRec ones at each of ``cfg.nprocs``) ``cfg.rounds`` times, each run in fresh
    processes, rotating the order per round. ``concurrent`` runs a round's processes side by side: faster, but only
    good for smoke tests. Results and errors are keyed by :func:`label`."""
    runs_of = [(v, n) for v in variants for n in (cfg.nprocs if v in SHARDED else (1,))]
    runs: dict[str, list[dict[str, Any]]] = {label(*r): [] for r in runs_of}
    errors: dict[str, str] = {}
    for r in range(cfg.rounds):
        turn = r % len(runs_of)
        order = [run for run in runs_of[turn:] + runs_of[:turn] if label(*run) not in errors]
        with ThreadPoolExecutor(max_workers=len(order) if concurrent else 1) as pool:
            futures = {label(v, n): pool.submit(_measure_variant, cfg, v, n, timeout_s) for v, n in order}
        for name, future in futures.items():
            try:
                runs[name].append(future.result())
            except RecopsError as exc:
                errors[name] = str(exc)
            print(
                f"round {r + 1}/{cfg.rounds} {name}: {'failed' if name in errors else 'done'}",
                file=sys.stderr,
                flush=True,
            )
    return runs, errors


def _config_from_args(args) -> ThroughputConfig:
    if args.quick:
        return ThroughputConfig(
            batch_sizes=(64, 256),
            embedding_dim=8,
            max_rows=2000,
            dense_arch=(16,),
            over_arch=(16,),
            warmup_steps=1,
            min_seconds=0.05,
            rounds=1,
            device=args.device,
            threads=args.threads,
            torchrec_path=args.torchrec_path,
            nprocs=args.nproc,
        )
    default = ThroughputConfig()
    return ThroughputConfig(
        batch_sizes=args.batch_sizes
        or ((4096, 8192, 16384, 32768, 65536) if args.device.startswith("cuda") else default.batch_sizes),
        embedding_dim=args.embedding_dim,
        max_rows=args.max_rows,
        table_rows=args.table_rows,
        dense_arch=args.dense_arch,
        over_arch=args.over_arch,
        embedding_optimizer=args.embedding_optimizer,
        zipf_a=args.zipf_a,
        min_seconds=args.min_seconds,
        rounds=args.rounds,
        device=args.device,
        threads=args.threads,
        tf32=not args.no_tf32,
        torchrec_path=args.torchrec_path,
        nprocs=args.nproc,
    )


def _parser():
    p = bench_parser(__doc__)
    d = ThroughputConfig()
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument(
        "--batch-sizes", type=_ints, default=None, help="e.g. 512,1024 (default: 512..8192 on CPU, 4096..65536 on CUDA)"
    )
    p.add_argument("--embedding-dim", type=int, default=d.embedding_dim)
    p.add_argument(
        "--max-rows",
        type=int,
        default=d.max_rows,
        help="cap on each table's Criteo Kaggle cardinality; 0 = full (33.8M rows)",
    )
    p.add_argument("--table-rows", type=int, default=d.table_rows, help="> 0: 26 tables of this many rows each")
    p.add_argument("--zipf-a", type=float, default=d.zipf_a, help="id skew; 0 = uniform random ids")
    p.add_argument("--dense-arch", type=_ints, default=d.dense_arch)
    p.add_argument("--over-arch", type=_ints, default=d.over_arch)
    p.add_argument("--embedding-optimizer", choices=("adagrad", "sgd"), default=d.embedding_optimizer)
    p.add_argument("--min-seconds", type=float, default=d.min_seconds, help="length of each timed repeat")
    p.add_argument("--rounds", type=int, default=d.rounds, help="processes per variant (interleaved); median over them")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument(
        "--nproc", type=_ints, default=d.nprocs, help=f"rank counts for {' and '.join(SHARDED)}, e.g. 1,2 (gloo/nccl)"
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a model and data shape (the options above it sets stay overridable): "
        + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()),
    )
    p.add_argument("--no-tf32", action="store_true", help="CUDA: full fp32 matmuls")
    p.add_argument(
        "--torchrec-path",
        choices=("auto", "dmp", "unsharded"),
        default="auto",
        help="torchrec variant: DMP + fused optimizer, or the unsharded EBC + regular optimizer "
        "(auto: unsharded on CUDA without fbgemm-gpu's CUDA kernels)",
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per variant process")
    p.add_argument(
        "--profile",
        metavar="VARIANTS",
        help="print torch.profiler's busiest operators of these variants (comma-separated, run in turn in one "
        "process) instead of benchmarking",
    )
    p.add_argument("--profile-batch", type=int, default=4096)
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, a ``--preset``'s values as defaults that explicit options override."""
    parser = _parser()
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    cfg = _config_from_args(args)
    if args.profile:
        import subprocess

        worker = [
            "-m",
            "recops.bench.dlrm_variants",
            "--profile",
            args.profile,
            "--config-json",
            json.dumps(cfg.to_dict()),
            "--profile-batch",
            str(args.profile_batch),
        ]
        return subprocess.run([sys.executable, *worker], env={**os.environ, **WORKER_ENV}).returncode
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise RecopsError(f"train_throughput: unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    runs, errors = run_all(cfg, variants, args.timeout, concurrent=args.quick)
    rows = summarize(runs, cfg)
    paths = {v: results[0]["path"] for v, results in runs.items() if results}
    plots = [
        {
            "x": "batch_size",
            "y": "samples_per_s",
            "series": "variant",
            "log_x": True,
            "title": "DLRM training throughput (samples/s)",
        }
    ]
    best = max(rows, key=lambda r: r["samples_per_s"], default=None)
    best = best and {k: best[k] for k in ("variant", "batch_size", "samples_per_s")}
    out = write_result(
        NAME,
        rows,
        args.results_dir,
        baseline=BASELINE,
        plots=plots,
        config=cfg.to_dict(),
        variants=paths,
        errors=errors,
        device=cfg.device,
        best=best,
        runs=runs,
    )
    print(pivot_table(rows) if rows else "no results")
    if args.quick:
        print("quick: variants ran concurrently on tiny tables; a smoke test, not a measurement")
    if best:
        print(
            f"best: {best['samples_per_s']:,.0f} samples/s ({best['variant']}, batch {best['batch_size']}, "
            f"{cfg.device})"
        )
    for v, msg in errors.items():
        print(f"{v}: FAILED: {msg}", file=sys.stderr)
    print(f"wrote {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    run_main(main, "train_throughput")
