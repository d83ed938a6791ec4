# SPDX-License-Identifier: Apache-2.0
"""pytest plugin for the PEFT-suite gate (loaded by tests/peft_suite/run.py into PEFT's own tests).

Both runs: records each test's outcome, and turns failures that only say "the Hugging Face hub is
unreachable" (the gate runs offline) into skips counted as `hub`.
Patched run (LORA_KERNELS_PEFT_SUITE_PATCH=1): every PEFT model is patched with
`lora_kernels.patch` right after it is built and again whenever adapters are added or loaded —
`BaseTuner.inject_adapter` (every path that creates LoRA layers: get_peft_model, PeftModel and
PeftMixedModel construction/from_pretrained, add_adapter, load_adapter, inject_adapter_in_model)
and the public entry points themselves — and the calls the patched layers make to the fused op
are counted per test module, and so are the calls of PEFT's own `lora.Linear.forward` (layers
left unpatched or handing a call back to PEFT).
Writes {"outcomes": {nodeid: passed|failed|skipped|hub}, "fused_calls": {module: n},
"peft_forwards": {module: n}, "kept_layers": {module: {patch()'s reason: layers}}, "patched_models": n} to $LORA_KERNELS_PEFT_SUITE_OUT at the end.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os

import pytest

PATCH = os.environ.get("LORA_KERNELS_PEFT_SUITE_PATCH") == "1"
# Text of the errors offline hub access raises (huggingface_hub / transformers / diffusers).
_HUB_SIGNS = (
    "huggingface.co",
    "offline mode",
    "hf_hub_offline",
    "localentrynotfounderror",
    "offlinemodeisenabled",
    "outgoing traffic has been disabled",
    "cannot find the requested files in the disk cache",
    "we couldn't connect to",
)

outcomes: dict = {}
fused_calls: collections.Counter = collections.Counter()
peft_forwards: collections.Counter = collections.Counter()
kept_layers: dict = collections.defaultdict(collections.Counter)
patched_models = 0
_current_module = None


def _needs_hub(excinfo) -> bool:
    exc = excinfo.value
    seen = 0
    while exc is not None and seen < 8:  # the cause chain: transformers wraps hub errors
        text = f"{type(exc).__name__} {exc}".lower()
        if any(sign in text for sign in _HUB_SIGNS):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _patch_model(model):
    """lora_kernels.patch on whatever a PEFT entry point returned or built (idempotent)."""
    global patched_models
    from lora_kernels.integrations import peft as integration

    if model is not None and hasattr(model, "modules"):
        report = integration.patch(model)
        patched_models += 1
        for reason, names in report.kept.items():  # the layers patch() leaves to PEFT, and why
            kept_layers[_current_module][reason] += len(names)
    return model


def _after(fn, target):
    """fn, then patch target(args, result)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        result = fn(*args, **kwargs)
        _patch_model(target(args, result))
        return result

    return wrapper


def _counted(fn, counter):
    """fn, counting its eager calls per test module in counter."""

    @functools.wraps(fn)
    def counting(*args, **kwargs):
        import torch

        if not torch.compiler.is_compiling():
            counter[_current_module] += 1
        return fn(*args, **kwargs)

    return counting


def _install_patching() -> None:
    import peft
    import peft.mapping_func
    from peft import PeftMixedModel, PeftModel
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTuner

    from lora_kernels.integrations import adapter

    adapter.fused_op = _counted(adapter.fused_op, fused_calls)
    # PEFT's own lora.Linear forward: unpatched layers, and patched ones handing a call back to it.
    LoraLinear.forward = _counted(LoraLinear.forward, peft_forwards)
    BaseTuner.inject_adapter = _after(BaseTuner.inject_adapter, lambda args, _: args[0].model)
    wrapped_get = _after(peft.mapping_func.get_peft_model, lambda args, result: result)
    peft.get_peft_model = peft.mapping_func.get_peft_model = wrapped_get
    for cls in (PeftModel, PeftMixedModel):
        for name in ("add_adapter", "load_adapter"):
            setattr(cls, name, _after(getattr(cls, name), lambda args, _: args[0]))
        from_pretrained = cls.from_pretrained.__func__
        cls.from_pretrained = classmethod(_after(from_pretrained, lambda args, result: result))


def _keep_offline() -> None:
    """PEFT's `hub_online_once(model_id)` switches the hub back on for a model's first use; offline,
    each such test then waits for network timeouts (~50 s each here) before it fails as `hub`.
    Replaced, before the test modules import it, by a context that leaves the hub off."""
    try:
        from tests import testing_utils  # PEFT's tests/ (cwd is the sdist root)
    except ImportError:
        return

    @contextlib.contextmanager
    def hub_stays_offline(model_id):
        yield

    testing_utils.hub_online_once = hub_stays_offline


def pytest_configure(config):
    _keep_offline()
    if PATCH:
        _install_patching()


def pytest_runtest_setup(item):
    global _current_module
    _current_module = item.nodeid.split("::")[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and _needs_hub(call.excinfo):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, "gate: needs the Hugging Face hub (offline)")
        report.lora_kernels_hub = True


def pytest_runtest_logreport(report):
    previous = outcomes.get(report.nodeid)
    if getattr(report, "lora_kernels_hub", False):
        outcomes[report.nodeid] = "hub"
    elif report.failed:
        outcomes[report.nodeid] = "failed"
    elif report.skipped and previous is None:
        outcomes[report.nodeid] = "skipped"
    elif report.when == "call" and report.passed and previous is None:
        outcomes[report.nodeid] = "passed"


def pytest_sessionfinish(session):
    path = os.environ.get("LORA_KERNELS_PEFT_SUITE_OUT")
    if path:
        with open(path, "w") as f:
            results = {"outcomes": outcomes, "fused_calls": dict(fused_calls), "peft_forwards": dict(peft_forwards)}
            results["kept_layers"] = {module: dict(reasons) for module, reasons in kept_layers.items()}
            json.dump({**results, "patched_models": patched_models}, f)
