"""A bounded sample of the fault-injection harness (``bench/faults.py``, run in full by `make bench`): `recops data
ingest` and `recops deploy` killed at random moments (SIGKILL, SIGTERM) or given a full disk, on a real Triton
server, with every invariant checked after each fault and after the reruns: no violation."""

from __future__ import annotations

from pathlib import Path

import onnx

from recops.bench.faults import run_scenarios
from recops.serving.onnx_model import OUTPUT_NAME
from tests.triton_fixtures import tiny_onnx_file


def deployable(onnx_path: Path, folder: Path) -> Path:
    """A directory with the tiny model as a deployment expects it: its score output named like an export's."""
    model = onnx.load(str(onnx_path))
    old = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [OUTPUT_NAME if name == old else name for name in node.output]
    model.graph.output[0].name = OUTPUT_NAME
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def test_a_sample_of_faults_violates_no_invariant(tmp_path: Path, tmp_path_factory) -> None:
    sources = [deployable(tiny_onnx_file(tmp_path_factory, seed), tmp_path / f"tiny-{seed}") for seed in (0, 1)]
    kills = {"ingest": 3, "deploy": 2}
    tallies = run_scenarios(list(kills), kills, tmp_path / "work", seed=7, rows=4000, deploy_sources=sources)
    for tally in tallies:
        assert tally.violations == [], tally.violations
        assert sum(tally.faults.values()) == kills[tally.scenario] and tally.reruns >= 1
        assert tally.invariants >= 8 * kills[tally.scenario]
