"""`recops manifests`: render the Kubernetes manifests (Triton, the loop, monitoring, KubeRay) from one values file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recops.cli.common import add_json_flag


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "manifests",
        help="render Kubernetes manifests for Triton, the loop, Prometheus "
        "and KubeRay from one values file (docs/gpu.md)",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write the manifests into")
    p.add_argument(
        "--values",
        type=Path,
        default=None,
        metavar="YAML",
        help="values file (default: the defaults listed in deploy/values.yaml)",
    )
    add_json_flag(p)
    p.set_defaults(func=manifests_command)


def manifests_command(args: argparse.Namespace) -> dict[str, Any]:
    from recops.deploy.render import write_manifests
    from recops.deploy.values import load_values

    values = load_values(args.values)
    written = write_manifests(args.out, values)
    return {
        "out": str(args.out),
        "files": [str(path.relative_to(args.out)) for path in written],
        "namespace": values.namespace,
        "image": values.image_ref,
        "model_repository": values.model_repository,
    }
