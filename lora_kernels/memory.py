# SPDX-License-Identifier: Apache-2.0
"""Measure what autograd saves for backward (docs/design.md §5): bytes by unique storage."""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch


def _storage_key(t: torch.Tensor):
    storage = t.untyped_storage()
    return (t.device.type, t.device.index, storage.data_ptr())


class SavedActivationMeter:
    """Context manager: records every tensor autograd saves while active, counted once per
    storage (views and tensors shared between layers count once), parameters excluded.

        with SavedActivationMeter(exclude=model.parameters()) as meter:
            loss = model(x).sum()
        meter.bytes  # saved activations of that forward

    Also usable via `start()` / `stop()` around several calls (e.g. a Trainer step).
    """

    def __init__(self, exclude: Optional[Iterable[torch.Tensor]] = None):
        self._excluded = {_storage_key(p) for p in (exclude or ()) if p is not None}
        self.storages: Dict[tuple, int] = {}
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key not in self._excluded:
            self.storages[key] = t.untyped_storage().nbytes()
        return t

    def start(self) -> SavedActivationMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def stop(self) -> None:
        self._hooks.__exit__(None, None, None)
        self._hooks = None

    def __enter__(self) -> SavedActivationMeter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def bytes(self) -> int:
        """Total bytes of the distinct storages saved."""
        return sum(self.storages.values())

    def bytes_excluding(self, *tensors: torch.Tensor) -> int:
        """Bytes saved beyond the storages of `tensors` (e.g. the layer input the caller holds)."""
        skip = {_storage_key(t) for t in tensors}
        return sum(n for key, n in self.storages.items() if key not in skip)
