# SPDX-License-Identifier: Apache-2.0
"""A patched PEFT model under DistributedDataParallel (2 CPU processes, gloo) gets the gradients
of one process on the same data.

p = 0: DDP over two half-batches equals one process on the whole batch.
p > 0: each rank draws its own dropout seed (here torch.manual_seed(100 + rank)) and its mask
covers its own shard's rows, so "equal" means: the DDP gradient equals the mean of the two
single-process gradients of each shard under that rank's seed.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("peft")

WORLD = 2
BATCH, K, N = 8, 24, 40


def build(p, patched=True):
    from peft import LoraConfig, get_peft_model

    import lora_kernels

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(K, N), torch.nn.GELU(), torch.nn.Linear(N, K))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["0", "2"], init_lora_weights=False)
    model = get_peft_model(base, config)
    if patched:
        report = lora_kernels.patch(model, strict=True)
        assert report.num_patched == 2
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, K, generator=g), torch.randn(BATCH, K, generator=g)


def grads(model, x, y, seed=None):
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    torch.nn.functional.mse_loss(model(x), y).backward()
    return {n.replace("module.", "", 1): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def shard(t, rank):
    per = t.shape[0] // WORLD
    return t[rank * per : (rank + 1) * per]


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        x, y = data()
        result = {}
        for p in (0.0, 0.3):
            ddp = DDP(build(p))
            result[p] = grads(ddp, shard(x, rank), shard(y, rank), seed=100 + rank)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, y = data()

    expected0 = grads(build(0.0), x, y)
    unpatched0 = grads(build(0.0, patched=False), x, y)
    expected_p = {}
    for rank in range(WORLD):
        for name, g in grads(build(0.3), shard(x, rank), shard(y, rank), seed=100 + rank).items():
            expected_p[name] = expected_p.get(name, 0) + g / WORLD

    assert len(expected0) == 4  # lora_A, lora_B of both layers
    assert not torch.allclose(expected_p["base_model.model.0.lora_A.default.weight"],
                              expected0["base_model.model.0.lora_A.default.weight"])  # dropout did act
    for result in ranks:
        for name in expected0:
            torch.testing.assert_close(result[0.0][name], expected0[name], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(result[0.0][name], unpatched0[name], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(result[0.3][name], expected_p[name], atol=1e-6, rtol=1e-5)
