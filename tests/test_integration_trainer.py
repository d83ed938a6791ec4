# SPDX-License-Identifier: Apache-2.0
"""LoRAKernelsCallback in a real (tiny, CPU, no downloads) transformers.Trainer run."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from transformers import Trainer, TrainingArguments  # noqa: E402

from lora_kernels.integrations import _common  # noqa: E402
from lora_kernels.integrations import peft as peft_integration  # noqa: E402
from lora_kernels.integrations.transformers import LoRAKernelsCallback  # noqa: E402
from integration_helpers import LLAMA_PROJECTIONS, FusedCalls, peft_llama  # noqa: E402


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=8, vocab=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train(tmp_path, callbacks, gradient_checkpointing=False):
    model = peft_llama(dropout=0.0)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        gradient_checkpointing=gradient_checkpointing,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=callbacks)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return model, losses


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_trainer_callback_patches_and_trains_like_peft(tmp_path, monkeypatch, gradient_checkpointing):
    fused_calls = FusedCalls(monkeypatch)
    _, losses_ref = train(tmp_path / "peft", [], gradient_checkpointing)
    assert fused_calls.take() == 0
    callback = LoRAKernelsCallback()
    model, losses = train(tmp_path / "fused", [callback], gradient_checkpointing)
    assert callback.report is not None and callback.report.num_patched == 2 * len(LLAMA_PROJECTIONS)
    assert fused_calls.take() > 0
    assert all(_common.is_patched(m) for m in model.modules() if isinstance(m, peft_integration.LoraLinear))
    assert len(losses) == len(losses_ref) == 2
    assert losses == pytest.approx(losses_ref, rel=1e-4, abs=1e-5)


def test_finetune_example_runs(tmp_path):
    """examples/finetune_tiny_llama.py end to end at toy size: JSON written, the fused path saves
    at p > 0 what it saves at p = 0 (plus an 8-byte seed per layer), less than PEFT at p > 0."""
    import importlib.util
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "finetune_tiny_llama.py")
    spec = importlib.util.spec_from_file_location("finetune_tiny_llama", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main([
        "--steps", "2", "--repeats", "1", "--warmup-steps", "0", "--interleaved-reps", "1", "--hidden", "32",
        "--heads", "2", "--vocab", "64", "--seq-len", "16", "--batch", "2", "--rank", "4", "--no-plot",
        "--out", str(tmp_path),
    ])
    result = json.loads((tmp_path / "finetune_tiny_llama.json").read_text())
    mem = result["saved_activations_mib"]
    assert mem["patched_p"] == pytest.approx(mem["patched_p0"], abs=1e-3) and mem["patched_p"] < mem["peft_p"]
    assert set(result["runs"]) == {"peft", "patched", "peft_other_masks"}
    assert "14 LoRA layer(s) fused" in result["runs"]["patched"]["patch_report"]
