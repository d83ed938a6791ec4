# SPDX-License-Identifier: Apache-2.0
"""`LoRAKernelsCallback`: patch the model a `transformers.Trainer` (or TRL's `SFTTrainer`, which is
one) trains, when training begins.

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      callbacks=[LoRAKernelsCallback()])

The callback patches `model` (the unwrapped model the Trainer hands to callbacks; DDP's wrapper
shares its modules) at `on_train_begin`, after the Trainer has set up gradient checkpointing and
moved the model to its device, and logs the `PatchReport` (also kept as `callback.report`).
"""

from __future__ import annotations

import logging
from typing import Optional

from transformers import TrainerCallback

from lora_kernels.integrations import PatchReport, patch, unpatch

logger = logging.getLogger(__name__)


class LoRAKernelsCallback(TrainerCallback):
    """Serve the trained model's PEFT / torchtune LoRA layers by `lora_kernels.lora_linear`.

    backend, strict, cast_adapters: as for `lora_kernels.patch`.
    unpatch_on_train_end: restore the original forwards when training ends (default: keep them
        patched, so evaluation and generation after training stay fused).
    """

    def __init__(
        self,
        backend: str = "auto",
        strict: bool = False,
        cast_adapters: bool = False,
        unpatch_on_train_end: bool = False,
    ):
        self.backend, self.strict, self.cast_adapters = backend, strict, cast_adapters
        self.unpatch_on_train_end = unpatch_on_train_end
        self.report: Optional[PatchReport] = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            logger.warning("LoRAKernelsCallback: the Trainer passed no model; nothing patched")
            return
        self.report = patch(model, strict=self.strict, backend=self.backend, cast_adapters=self.cast_adapters)
        if state is None or state.is_world_process_zero:
            logger.info("%s", self.report)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.unpatch_on_train_end and model is not None:
            unpatch(model)
