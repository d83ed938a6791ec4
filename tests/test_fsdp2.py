# SPDX-License-Identifier: Apache-2.0
"""A patched PEFT model under FSDP2 (`fully_shard`, 2 CPU processes, gloo): `patch()` before or
after `fully_shard` fuses the LoRA layers, and the gradients equal one process on the same data.

FSDP2 keeps parameters as DTensor shards between calls and gathers them into plain tensors for
each forward/backward, so the fused forward, checked per call, sees plain tensors there.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("peft")
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)

from test_ddp import BATCH, WORLD, K, build, data, shard  # noqa: E402  (same model and data)

ORDERS = ("patch-then-shard", "shard-then-patch", "shard-root-only-then-patch")


def sharded_model(order, mesh, fused_counter):
    from peft.tuners.lora.layer import Linear as LoraLinear

    import lora_kernels

    model = build(0.0, patched=order == "patch-then-shard")
    if order != "shard-root-only-then-patch":
        for module in model.modules():
            if isinstance(module, LoraLinear):
                fsdp.fully_shard(module, mesh=mesh)
    fsdp.fully_shard(model, mesh=mesh)
    if order != "patch-then-shard":
        report = lora_kernels.patch(model, strict=True)
        assert report.num_patched == 2, str(report)
    return model


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        from lora_kernels.integrations import adapter as integration

        mesh = init_device_mesh("cpu", (WORLD,))
        calls = [0]
        original = integration.fused_op

        def counting(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)

        integration.fused_op = counting
        x, y = data()
        result = {}
        for order in ORDERS:
            calls[0] = 0
            model = sharded_model(order, mesh, calls)
            loss = torch.nn.functional.mse_loss(model(shard(x, rank)), shard(y, rank))
            loss.backward()
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
            result[order] = (grads, calls[0])
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_patch_before_or_after_fully_shard(tmp_path):
    assert BATCH % WORLD == 0 and K > 0
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    x, y = data()
    model = build(0.0, patched=False)
    torch.nn.functional.mse_loss(model(x), y).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(expected) == 4  # lora_A, lora_B of both layers
    for rank in range(WORLD):
        for order, (grads, calls) in torch.load(tmp_path / f"rank{rank}.pt").items():
            assert calls == 2, f"{order}: the fused op ran {calls} times on rank {rank}, expected 2"
            assert grads.keys() == expected.keys(), order
            for name in expected:
                torch.testing.assert_close(grads[name], expected[name], atol=1e-6, rtol=1e-5, msg=f"{order} {name}")
