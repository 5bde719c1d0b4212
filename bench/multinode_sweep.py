"""Multi-node sweeps on one machine: the sweep_overhead trainings on a 2-node Ray cluster versus a local Ray.

The cluster (``recops.bench.local_cluster``) is a head and a worker node, separate ``ray start`` processes with
1 CPU each; the sweep attaches to it through the GCS address and through Ray Client (``ray://``), 2 trials at a
time, one per node. ``local_c2`` is the same sweep on a local single-node Ray with 2 CPUs, ``sequential`` the
trainings back to back in this process. ``cluster_start_s`` is the time to start both nodes (not in ``wall_s``),
``nodes_used`` how many nodes ran trials. On one 2-core machine the nodes share the same cores: this measures what
crossing nodes costs (scheduling, Ray Client), not a speed-up.

``python -m recops.bench.multinode_sweep [--trials 4] [--epochs 2] [--rows 20000] [--quick]``
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from recops.bench.common import bench_parser, format_table, write_result
from recops.bench.local_cluster import local_cluster
from recops.bench.sweep_overhead import LEARNING_RATES, make_dataset, row, sequential, through_ray

NAME = "multinode_sweep"
NODES = {"node_a": 1, "node_b": 1}


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--trials", type=int, default=4, help=f"trainings per variant (at most {len(LEARNING_RATES)})")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rows", type=int, default=20_000, help="synthetic rows (80%% train)")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.epochs, args.rows = 2, 1, 6000
    rates = list(LEARNING_RATES[: args.trials])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as on the cluster's nodes
    import recops.training.train  # noqa: F401  - import torch/torchrec before any clock starts

    with tempfile.TemporaryDirectory(prefix="bench-multinode-") as tmp:
        work = Path(tmp)
        dataset = make_dataset(work, args.rows)
        measured = {
            "sequential": sequential(dataset, rates, args.epochs, work / "seq"),
            "local_c2": through_ray(dataset, rates, args.epochs, 2, work / "local"),
        }
        start = time.perf_counter()
        with local_cluster(NODES) as cluster:
            cluster_start_s = time.perf_counter() - start
            for name, address in (("2nodes_gcs", cluster.address), ("2nodes_ray_client", cluster.client_address)):
                measured[name] = through_ray(dataset, rates, args.epochs, 2, work / name, address)
    base = measured["sequential"]["wall_s"]
    rows = [
        {
            **row(name, m, args.trials, 1 if name == "sequential" else 2, base),
            "nodes": len(NODES) if name.startswith("2nodes") else 1,
            "nodes_used": len(m.get("nodes", {})) or 1,
            "cluster_start_s": round(cluster_start_s, 2) if name.startswith("2nodes") else None,
        }
        for name, m in measured.items()
    ]
    path = write_result(
        NAME,
        rows,
        args.results_dir,
        baseline="sequential",
        plots=[{"x": "trials", "y": "wall_s", "series": "variant", "title": f"{args.trials} trainings: wall time (s)"}],
        config={"trials": args.trials, "epochs": args.epochs, "rows": args.rows, "nodes": NODES},
    )
    print(format_table(rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
