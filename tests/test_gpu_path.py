"""The CUDA training path the GPU benchmark measures: the same model gives the same logits and gradients
on the GPU as on the CPU, and every benchmark variant trains there. Skipped without CUDA."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

from recops.bench.dlrm_variants import build_variant, synthetic_batches
from recops.bench.train_throughput import VARIANTS, ThroughputConfig
from recops.training.config import ModelConfig
from recops.training.model import DLRM, to_kjt

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_dlrm_forward_backward_on_cuda_matches_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    tables = {f"C{i}": n for i, n in enumerate((1000, 50, 7, 20000), start=1)}
    torch.manual_seed(0)
    cpu = DLRM(ModelConfig(tables=tables, num_dense=13, embedding_dim=16))
    gpu = DLRM(ModelConfig(tables=tables, num_dense=13, embedding_dim=16), device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    ids = torch.stack([torch.randint(0, n, (256,)) for n in tables.values()], dim=1)
    dense = torch.rand(256, 13)
    kjt = to_kjt(list(tables), ids)
    out_cpu, out_gpu = cpu(dense, kjt), gpu(dense.cuda(), kjt.to(torch.device("cuda")))
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-4, atol=1e-5)
    out_cpu.square().mean().backward()
    out_gpu.square().mean().backward()
    for (name, p_cpu), (_, p_gpu) in zip(cpu.named_parameters(), gpu.named_parameters()):
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_benchmark_variants_train_on_cuda(variant):
    cfg = ThroughputConfig(max_rows=10_000, device="cuda")
    bind, path = build_variant(variant, cfg)
    with ExitStack() as stack:
        step = bind(synthetic_batches(cfg, 1024, count=3, pin=True), stack)
        losses = [float(step()) for _ in range(3)]
    torch.cuda.synchronize()
    assert path and all(0 < loss < 10 for loss in losses)
