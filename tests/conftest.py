# SPDX-License-Identifier: Apache-2.0
import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    # triton decorates its own jit helpers (tl.randint4x, ...) at import: only those decorated
    # under TRITON_INTERPRET=1 run in the interpreter, so import it that way before any test
    # module does. The variable is restored at once; test_triton.py sets it for its own tests.
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    with contextlib.suppress(ImportError):
        import triton.language  # noqa: F401
    if previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = previous


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["eager", "custom_op"])
def path(request, monkeypatch):
    """The eager autograd.Function, or the torch.library custom op that lora_linear calls while
    torch.compile traces (both save for backward on their own: tests/test_dropin.py, test_memory.py)."""
    if request.param == "custom_op":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    return request.param
