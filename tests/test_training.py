"""TorchRec DLRM training: quality against the generator's oracle, sharded gloo runs, checkpoints."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import KeyedTensor
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.train_pipeline.runtime_forwards import PipelinedForward

from recops.errors import RecopsError
from recops.processes import descendants, living
from recops.training.checkpoint import Checkpoint
from recops.training.config import ModelConfig, TrainConfig
from recops.training.dataset import Dataset, ingest
from recops.training.loader import BatchLoader
from recops.training.model import in_key_order
from recops.training.spec import ColumnSpec, PreprocessConfig
from recops.training.synth import SynthConfig, write
from recops.training.train import build_model, describe_rank_failure, fit, train_all
from tests.conftest import ROOT, recops

FAST = TrainConfig(epochs=2, batch_size=1024, threads=1)
SHARDED = TrainConfig(epochs=3, batch_size=1024, threads=1)


@pytest.fixture(scope="module")
def quality_data(tmp_path_factory):
    """60k rows: enough to learn most of the planted function in seconds."""
    raw = tmp_path_factory.mktemp("q")
    summary = write(SynthConfig(rows=60_000, seed=5), raw)
    ds = ingest([raw / "data.tsv"], raw / "ds", config=PreprocessConfig(table_size=5000))
    test = ds.split("test")
    return ds, summary, test


@pytest.fixture(scope="module")
def single_run(quality_data, tmp_path_factory):
    ds, _, _ = quality_data
    out = tmp_path_factory.mktemp("single")
    return fit(ds.path, ModelConfig(), TrainConfig(epochs=3, batch_size=1024, threads=2), out), out


def test_quality_reaches_most_of_the_oracle_auc(quality_data, single_run):
    """CI-sized version of the 1M-row bar (0.98 x oracle): 48k train rows must reach 0.96 x oracle."""
    ds, summary, _ = quality_data
    result, _ = single_run
    assert result.auc >= 0.96 * summary["oracle_auc"], (result.auc, summary["oracle_auc"])
    assert result.history[-1]["val_auc"] > result.history[0]["val_auc"] - 0.01
    assert result.samples_per_s > 0 and result.epochs == len(result.history)


@pytest.fixture(scope="module")
def sharded_run(quality_data, tmp_path_factory):
    """3 epochs on 2 gloo ranks (left as they are: tests that resume it copy it first)."""
    ds, _, _ = quality_data
    out = tmp_path_factory.mktemp("sharded")
    return fit(ds.path, ModelConfig(), SHARDED, out, nproc=2), out


def test_two_process_gloo_run_follows_the_single_process_trend_and_resumes_in_one(
    quality_data, single_run, sharded_run, tmp_path
):
    ds, summary, _ = quality_data
    (single, _), (sharded, sharded_out) = single_run, sharded_run
    assert abs(sharded.auc - single.auc) < 0.02
    assert sharded.auc >= 0.95 * summary["oracle_auc"]
    best = Checkpoint.open(sharded.checkpoint)
    assert best.meta.world_size == 2
    table_bytes = sum(rows * 16 * 4 for rows in best.meta.model.tables.values())
    shards = sorted((best.path / "model").glob("*.distcp"))  # each rank wrote its own tables: no gather
    assert [p.name for p in shards] == ["__0_0.distcp", "__1_0.distcp"]
    assert all(0.2 * table_bytes < p.stat().st_size < 0.8 * table_bytes for p in shards)
    state = best.load().model
    for name, rows in best.meta.model.tables.items():  # read back as whole tables
        assert state[f"ebc.embedding_bags.t_{name}.weight"].shape == (rows, 16)

    run = tmp_path / "run"
    shutil.copytree(sharded_out / "checkpoints", run / "checkpoints")
    same = fit(ds.path, ModelConfig(), SHARDED, run, nproc=1)  # nothing left to train: the best model, resharded
    assert same.test_auc == pytest.approx(sharded.test_auc, abs=1e-6) and same.history == sharded.history
    more = fit(ds.path, ModelConfig(), dataclasses.replace(SHARDED, epochs=4, patience=9), run, nproc=1)
    assert [h["epoch"] for h in more.history] == [1, 2, 3, 4] and more.history[:3] == sharded.history
    assert Checkpoint.open(run / "checkpoints" / "latest").meta.world_size == 1
    assert more.auc >= 0.95 * summary["oracle_auc"]


def test_a_failing_rank_is_one_clear_error_naming_the_rank_and_its_log(quality_data, tmp_path):
    ds, _, _ = quality_data
    expected = r"rank [01] of the run failed \(.*is not a complete checkpoint.*rank-[01]\.log"
    with pytest.raises(RecopsError, match=expected) as err:
        fit(ds.path, ModelConfig(), FAST, tmp_path / "run", nproc=2, warm_start=tmp_path / "missing")
    assert "\n" not in str(err.value) and all((tmp_path / "run" / "logs" / f"rank-{r}.log").is_file() for r in (0, 1))


def test_a_rank_that_aborts_is_reported_with_the_abort_and_its_latest_frames(tmp_path):
    """What a rank killed by SIGABRT left in its log (a C++ message, then faulthandler's stack, latest frame first)
    ends up in the one-line error, not the outermost frames."""
    from torch.multiprocessing.spawn import ProcessExitedException

    dump = [
        "FutureWarning: something",
        "terminate called after throwing an instance of 'gloo::IoException'",
        "  what():  Connection reset by peer",
        "Fatal Python error: Aborted",
        "Current thread 0x7f (most recent call first):",
        '  File "training/train.py", line 131 in train_all',
        *[f'  File "outer.py", line {n} in <module>' for n in range(30)],
    ]
    (tmp_path / "rank-1.log").write_text("\n".join(dump) + "\n")
    exc = ProcessExitedException("process 1 terminated with signal SIGABRT", 1, 4242, -6, "SIGABRT")
    message = describe_rank_failure(exc, tmp_path)
    assert message.startswith("train: rank 1 of the run failed (process 1 terminated with signal SIGABRT)")
    assert "gloo::IoException" in message and "train_all" in message and "\n" not in message


def test_optimizer_state_and_weights_reshard_from_two_ranks_into_one(sharded_run):
    """The sharded load lands every rank-0 and rank-1 shard of a 2-rank checkpoint in a 1-rank model."""
    ckpt = Checkpoint.open(sharded_run[0].checkpoint)
    whole = ckpt.load()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model, dense_opt = build_model(ckpt.meta.model, ckpt.meta.train, torch.device("cpu"))
        dense_opt.init_state()
        model_sd = model.state_dict()
        optim_sd = {"dense": dense_opt.state_dict(), "fused": model.fused_optimizer.state_dict()}
        ckpt.load_sharded(model_sd, optim_sd)
    finally:
        dist.destroy_process_group()
    assert set(model_sd) == set(whole.model)
    for key, value in model_sd.items():
        assert torch.equal(local(value), whole.model[key]), key
    fused, dense = optim_sd["fused"]["state"], optim_sd["dense"]["state"]
    assert set(fused) == set(whole.optim["fused"]["state"]) and len(fused) == 26
    for param, states in [*fused.items(), *dense.items()]:
        group = "fused" if param in fused else "dense"
        for name, value in states.items():
            expected = whole.optim[group]["state"][param][name]
            assert torch.equal(local(value), expected), (param, name)
            assert name == "step" or expected.abs().sum() > 0  # trained state, not initial zeros


def local(value: torch.Tensor) -> torch.Tensor:
    """A tensor of a 1-rank state dict: a ShardedTensor's one whole shard, or the tensor itself."""
    return value.local_shards()[0].tensor if isinstance(value, ShardedTensor) else value


def test_dcn_and_multi_hot_features_train(tmp_path):
    rng = np.random.default_rng(0)
    n = 6000
    tags = rng.integers(0, 30, size=(n, 3))
    y = (np.isin(tags, [1, 2, 3]).any(1) ^ (rng.random(n) < 0.1)).astype(int)
    import pandas as pd

    frame = pd.DataFrame(
        {
            "label": y,
            "x": rng.random(n),
            "user": rng.integers(0, 50, n).astype(str),
            "tags": ["|".join(map(str, t[: rng.integers(1, 4)])) for t in tags],
        }
    )
    frame.to_csv(tmp_path / "mh.csv", index=False)
    spec = ColumnSpec(dense=("x",), sparse=("user",), multi_hot={"tags": 3}, format="csv")
    ds = ingest([tmp_path / "mh.csv"], tmp_path / "ds", spec=spec, config=PreprocessConfig(table_size=200))
    result = fit(ds.path, ModelConfig(family="dcn"), TrainConfig(epochs=3, batch_size=256, threads=1), tmp_path / "run")
    assert result.auc > 0.7  # the multi-hot feature carries the signal (test split: 600 rows, AUC +-0.02)


def test_resume_continues_from_the_latest_checkpoint(tiny_dataset, tmp_path):
    first = fit(tiny_dataset.path, ModelConfig(), TrainConfig(epochs=1, batch_size=1024, threads=1), tmp_path)
    resumed = fit(tiny_dataset.path, ModelConfig(), TrainConfig(epochs=2, batch_size=1024, threads=1), tmp_path)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[0] == first.history[0]  # epoch 1 was not redone
    fresh = fit(tiny_dataset.path, ModelConfig(), TrainConfig(epochs=2, batch_size=1024, threads=1), tmp_path / "fresh")
    assert fresh.history[1]["val_auc"] == pytest.approx(resumed.history[1]["val_auc"], abs=2e-3)


def test_seeded_runs_are_reproducible(tiny_dataset, tmp_path):
    a = fit(tiny_dataset.path, ModelConfig(), FAST, tmp_path / "a")
    b = fit(tiny_dataset.path, ModelConfig(), FAST, tmp_path / "b")
    assert a.auc == pytest.approx(b.auc, abs=1e-6) and a.val_auc == pytest.approx(b.val_auc, abs=1e-6)


def test_checkpoint_files_are_all_hashed_and_corruption_is_reported(tiny_dataset, tmp_path):
    result = fit(tiny_dataset.path, ModelConfig(), TrainConfig(epochs=1, batch_size=2048, threads=1), tmp_path)
    best = Checkpoint.open(result.checkpoint)
    recorded = json.loads((best.path / "files.json").read_text())
    on_disk = {str(p.relative_to(best.path)) for p in best.path.rglob("*") if p.is_file()}
    assert set(recorded) == on_disk - {"files.json"} and not best.legacy
    assert {"model/.metadata", "model/__0_0.distcp", "optim/.metadata", "trainer.json"} <= set(recorded)
    assert not list(tmp_path.glob("checkpoints/.*"))  # no staging leftovers
    state = best.load(optim=False)
    assert state.optim is None and all(type(v) is torch.Tensor for v in state.model.values())

    latest = Checkpoint.open(tmp_path / "checkpoints" / "latest")  # the same state and metadata, saved again
    assert latest.fingerprint == best.fingerprint == best.copy_to(tmp_path / "copy").fingerprint
    renamed = best.copy_to(tmp_path / "other", dataclasses.replace(best.meta, warm_start_from="x"))
    assert renamed.fingerprint != best.fingerprint

    broken = tmp_path / "broken"
    shutil.copytree(result.checkpoint, broken)
    data = bytearray((broken / "model" / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "model" / "__0_0.distcp").write_bytes(bytes(data))
    with pytest.raises(RecopsError, match="model/__0_0.distcp do not match the recorded sha256"):
        Checkpoint.open(broken).load()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RecopsError, match="model/__0_0.distcp do not match the recorded sha256"):
            Checkpoint.open(broken).load_sharded({}, {})
    finally:
        dist.destroy_process_group()
    (broken / "files.json").unlink()
    with pytest.raises(RecopsError, match="not a complete checkpoint"):
        Checkpoint.open(broken)

    copy = tmp_path / "copy"  # a swap cut short: the previous checkpoint moved aside, the new one not in place
    copy.rename(tmp_path / ".copy.previous")
    assert Checkpoint.exists(copy) and Checkpoint.open(copy).fingerprint == best.fingerprint


def write_legacy(ckpt: Checkpoint, dst: Path) -> Checkpoint:
    """``ckpt`` in the old format: unsharded ``model.pt`` and ``optim.pt`` as the gathering save wrote them."""
    state = ckpt.load()
    dst.mkdir(parents=True)
    torch.save(state.model, dst / "model.pt")
    torch.save(state.optim, dst / "optim.pt")
    shutil.copyfile(ckpt.path / "trainer.json", dst / "trainer.json")
    sums = {f: hashlib.sha256((dst / f).read_bytes()).hexdigest() for f in ("model.pt", "optim.pt", "trainer.json")}
    (dst / "files.json").write_text(json.dumps(sums))
    return Checkpoint.open(dst)


def test_old_format_checkpoints_load_and_resume_in_the_sharded_format(tiny_dataset, tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=1024, threads=1)
    first = fit(tiny_dataset.path, ModelConfig(), cfg, tmp_path / "new")
    new = Checkpoint.open(first.checkpoint)
    run = tmp_path / "old-run"
    for name in ("latest", "best"):
        old = write_legacy(Checkpoint.open(tmp_path / "new" / "checkpoints" / name), run / "checkpoints" / name)
    assert old.legacy and old.verify() is None
    for key, value in new.load().model.items():
        assert torch.equal(old.load().model[key], value), key
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RecopsError, match="old unsharded format .*copy it into the sharded format"):
            old.load_sharded({}, {})
    finally:
        dist.destroy_process_group()

    resumed = fit(tiny_dataset.path, ModelConfig(), dataclasses.replace(cfg, epochs=2), run)
    assert [h["epoch"] for h in resumed.history] == [1, 2] and resumed.history[0] == first.history[0]
    assert not Checkpoint.open(run / "checkpoints" / "latest").legacy
    fresh = fit(tiny_dataset.path, ModelConfig(), dataclasses.replace(cfg, epochs=2), tmp_path / "new")
    assert resumed.history[1]["val_auc"] == pytest.approx(fresh.history[1]["val_auc"], abs=1e-6)

    legacy = write_legacy(new, tmp_path / "o")
    warm = fit(tiny_dataset.path, ModelConfig(), cfg, tmp_path / "warm", warm_start=legacy.path)
    seeded = Checkpoint.open(tmp_path / "warm" / "checkpoints" / "latest")
    assert seeded.meta.warm_start_from == str(legacy.path) and not seeded.legacy
    assert warm.history[0]["val_auc"] != pytest.approx(first.history[0]["val_auc"], abs=1e-6)  # not from scratch


def test_the_training_pipeline_trains_like_plain_steps(tiny_dataset):
    """TorchRec's pipeline (ids distributed a batch ahead, the EBC's forward replaced) computes what plain
    forward/backward/step does, batch for batch."""
    feats = Dataset.open(tiny_dataset.path).split("train")
    config = ModelConfig().for_data(Dataset.open(tiny_dataset.path).table_sizes, 13)
    indices = [np.arange(i, i + 512) for i in range(0, 4096, 512)]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain, plain_opt = build_model(config, FAST, torch.device("cpu"))
        with BatchLoader(feats, list(config.tables), indices) as batches:
            expected = []
            for batch in batches:
                loss, _ = plain(batch)
                plain_opt.zero_grad()
                loss.backward()
                plain_opt.step()
                expected.append(loss.detach())
        torch.manual_seed(0)
        piped, piped_opt = build_model(config, FAST, torch.device("cpu"))
        pipeline = TrainPipelineSparseDist(piped, piped_opt, torch.device("cpu"))
        with BatchLoader(feats, list(config.tables), indices) as batches:
            losses, samples = train_all(pipeline, iter(batches))
        assert isinstance(piped.module.ebc.forward, PipelinedForward)
    finally:
        dist.destroy_process_group()
    assert samples == 4096 and len(losses) == 8
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), rtol=0, atol=1e-6)
    assert losses[-1] < losses[0]
    for (key, a), b in zip(plain.state_dict().items(), piped.state_dict().values()):
        torch.testing.assert_close(local(a), local(b), rtol=0, atol=1e-6, msg=key)


def test_pooled_embeddings_of_a_sharded_collection_are_put_back_in_model_order():
    values = torch.arange(2 * 9, dtype=torch.float32).view(2, 9)
    pooled = KeyedTensor(keys=["c", "a", "b"], length_per_key=[2, 3, 4], values=values)  # plan order, mixed dims
    by_key = pooled.to_dict()
    assert torch.equal(in_key_order(pooled, ["a", "b", "c"]), torch.cat([by_key[k] for k in "abc"], dim=1))
    assert in_key_order(pooled, ["c", "a", "b"]).data_ptr() == values.data_ptr()  # already in order: a view


def test_unsupported_sharding_type_on_cpu_is_a_clear_error(tiny_dataset, tmp_path):
    with pytest.raises(RecopsError, match="row_wise is not available on cpu"):
        fit(tiny_dataset.path, ModelConfig(), TrainConfig(epochs=1, sharding_type="row_wise"), tmp_path)


def test_cli_train_json_contract(tiny_dataset, tmp_path):
    out = recops("train", "--data", str(tiny_dataset.path), "--out", str(tmp_path), "--epochs", "1", "--json")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"auc", "logloss", "samples_per_s", "checkpoint"} <= set(result)
    assert 0.5 < result["auc"] <= 1 and result["samples_per_s"] > 0
    bad = recops("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path), "--json", check=False)
    assert bad.returncode == 2 and "no manifest.json" in bad.stderr and "Traceback" not in bad.stderr


def test_a_killed_two_process_run_leaves_no_rank_and_writes_nothing_after(tiny_dataset, tmp_path):
    """`recops train --nproc 2` SIGKILLed after its first checkpoint: no rank (or helper) survives, and nothing in
    --out changes afterwards."""
    out = tmp_path / "run"
    train = subprocess.Popen(
        [sys.executable, "-m", "recops.cli", "train", "--data", str(tiny_dataset.path), "--out", str(out)]
        + ["--epochs", "50", "--patience", "50", "--nproc", "2", "--batch-size", "512"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "latest").is_dir() and time.monotonic() < deadline:
            assert train.poll() is None, "training ended before its first checkpoint"
            time.sleep(0.2)
        family = descendants(train.pid)
        assert len(family) >= 2, "two ranks run"
    finally:
        train.kill()
        train.wait()
    deadline = time.monotonic() + 10
    while living(family) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert living(family) == [], "a rank outlived its killed command"
    before = _snapshot(out)
    time.sleep(3)
    assert _snapshot(out) == before, "a rank kept writing after its command was killed"


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}
