# SPDX-License-Identifier: Apache-2.0
"""DoRA (lora_kernels.variants.dora): dora_linear against its fp64 oracle (PEFT's formula) on every
CPU backend, against PEFT's own DoRA layer, the shared dropout mask, the ‖W₀ₙ‖² cache, memory
(no N x K temporary, saved activations) and input errors."""

import pytest
import torch
import torch.nn as nn
from torch._C._profiler import _EventType

import lora_kernels
from lora_kernels.base_weights import FORMATS, BaseWeight, DenseWeight
from lora_kernels.dropout import draw_seed, dropout_multiplier
from lora_kernels.memory import SavedActivationMeter
from lora_kernels.variants import VARIANTS
from lora_kernels.variants import dora as dora_module
from lora_kernels.variants.dora import dora_linear, dora_linear_eager, init_magnitude, weight_norm
from helpers import assert_close, make_inputs

# triton runs on CPU tensors only under its (slow) interpreter: the parity suite covers it elsewhere.
BACKENDS = [b for b in lora_kernels.available_backends("cpu") if b != "triton"]
SCALING = 0.75


def make_dora(lead, k, n, r, dtype, bias=True, seed=0):
    """make_inputs plus a magnitude near PEFT's initial one, perturbed so c = m/‖W₀ + s·B·A‖ ≠ 1."""
    x, weight, b, lora_A, lora_B = make_inputs(lead, k, n, r, dtype, bias=bias, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    noise = 1.0 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    magnitude = (init_magnitude(weight, lora_A, lora_B, SCALING).double() * noise).to(dtype).requires_grad_()
    return x, weight, b, lora_A, lora_B, magnitude


def oracle_grads(x, weight, b, lora_A, lora_B, magnitude, p, seed, grad_y, dtype=torch.float64):
    """dora_linear_eager in `dtype` (fp64: the oracle; the inputs' dtype: the low-precision
    baseline): y and the gradients of x, A, B, m."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, lora_A, lora_B, magnitude)]
    bias = None if b is None else b.to(dtype)
    y = dora_linear_eager(leaves[0], weight.to(dtype), bias, leaves[1], leaves[2], leaves[3], SCALING, p, seed)
    return y.detach(), torch.autograd.grad(y, leaves, grad_y.to(dtype))


def check_against_oracle(backend, lead, k, n, r, dtype, p, bias=True, training=True):
    x, weight, b, lora_A, lora_B, magnitude = make_dora(lead, k, n, r, dtype, bias)
    torch.manual_seed(1234)
    y = dora_linear(x, weight, b, lora_A, lora_B, magnitude, SCALING, p, training=training, backend=backend)
    torch.manual_seed(1234)  # the seed dora_linear drew: the oracle's mask is the op's
    active_p = p if training else 0.0
    seed = draw_seed("cpu") if active_p > 0 else None
    grad_y = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    y_ref, grads_ref = oracle_grads(x, weight, b, lora_A, lora_B, magnitude, active_p, seed, grad_y)
    low = dtype in (torch.float16, torch.bfloat16)
    y_low, grads_low = oracle_grads(x, weight, b, lora_A, lora_B, magnitude, active_p, seed, grad_y, dtype) if low \
        else (None, [None] * 4)
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert_close(y, y_ref, dtype, "y", y_low)
    grads = torch.autograd.grad(y, (x, lora_A, lora_B, magnitude), grad_y)
    for name, got, want, base in zip(("grad_x", "grad_A", "grad_B", "grad_magnitude"), grads, grads_ref, grads_low):
        assert_close(got, want, dtype, name, base)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p,training", [(0.0, True), (0.1, True), (0.1, False)], ids=["p0", "p0.1", "eval"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_oracle(backend, dtype, p, training, bias):
    check_against_oracle(backend, (5, 7), 37, 45, 3, dtype, p, bias, training)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("lead,k,n,r", [((2, 3, 4), 29, 31, 3), ((1,), 16, 8, 4), ((70,), 130, 67, 16), ((0,), 12, 10, 4)],
                         ids=lambda v: str(v).replace(" ", ""))
def test_shapes(backend, p, lead, k, n, r):
    check_against_oracle(backend, lead, k, n, r, torch.float32, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_chunks_regenerate_the_mask(backend, monkeypatch):
    """Chunks of 3 rows of K = 45: chunk starts fall mid Philox group (3·45 mod 8 ≠ 0), so a chunk
    that took its mask from the wrong flat offset would differ from the oracle."""
    monkeypatch.setattr(dora_module, "MIN_CHUNK_ROWS", 3)
    monkeypatch.setattr(dora_module, "CHUNK_ELEMENTS", 1)
    check_against_oracle(backend, (4, 5), 45, 23, 4, torch.float64, 0.4)


def test_python_mask_matches_compiled(monkeypatch):
    """The generator's Python mirror (devices without the compiled bits) gives the same result."""
    monkeypatch.setattr(dora_module, "MIN_CHUNK_ROWS", 3)
    monkeypatch.setattr(dora_module, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(dora_module, "_has_keep_bits", lambda device: False)
    check_against_oracle("reference", (4, 5), 45, 23, 4, torch.float64, 0.4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_seed_shares_the_mask(backend):
    """A caller's seed gives the oracle's mask (and the same seed the same output twice)."""
    x, weight, b, lora_A, lora_B, magnitude = make_dora((9,), 24, 20, 4, torch.float64)
    seed = torch.tensor([987654321], dtype=torch.int64)
    y1 = dora_linear(x, weight, b, lora_A, lora_B, magnitude, SCALING, 0.5, backend=backend, seed=seed)
    y2 = dora_linear(x, weight, b, lora_A, lora_B, magnitude, SCALING, 0.5, backend=backend, seed=seed)
    y_ref = dora_linear_eager(x, weight, b, lora_A, lora_B, magnitude, SCALING, 0.5, seed)
    assert torch.equal(y1, y2)
    assert_close(y1, y_ref, torch.float64, "y")


def test_drop_everything():
    """p = 1 drops all of x′: y is the base layer's output; A, B and m get zero gradients (as PEFT)."""
    x, weight, b, lora_A, lora_B, magnitude = make_dora((6,), 16, 12, 4, torch.float64)
    y = dora_linear(x, weight, b, lora_A, lora_B, magnitude, SCALING, 1.0)
    assert_close(y, torch.nn.functional.linear(x, weight, b), torch.float64, "y")
    grads = torch.autograd.grad(y.sum(), (lora_A, lora_B, magnitude))
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_nan_at_a_dropped_element_propagates():
    """x′ = x·D is a product, as torch's dropout: a NaN where the mask drops still reaches x′·W₀ᵀ
    (the whole of y is NaN on that row anyway through x·W₀ᵀ, so this looks at the masked product)."""
    x, weight, _, _, _, _ = make_dora((8,), 16, 12, 4, torch.float64)
    x = x.detach().clone()
    seed, p = torch.tensor([5], dtype=torch.int64), 0.5
    dropped = (dropout_multiplier(5, 8, 16, p, torch.float64, "cpu") == 0).nonzero()[0].tolist()
    x[dropped[0], dropped[1]] = float("nan")
    w = dora_module._masked_base_into_output(x, torch.zeros(8, 12, dtype=torch.float64),
                                             torch.zeros(12, dtype=torch.float64), DenseWeight(weight), p, seed)
    assert w.isnan().sum(1).tolist() == [12 if i == dropped[0] else 0 for i in range(8)]


def test_base_weight_object():
    x, weight, b, lora_A, lora_B, magnitude = make_dora((6,), 16, 12, 4, torch.float64)
    y = dora_linear(x, DenseWeight(weight), b, lora_A, lora_B, magnitude, SCALING)
    assert_close(y, dora_linear_eager(x, weight, b, lora_A, lora_B, magnitude, SCALING), torch.float64, "y")


class PlainWeight(BaseWeight):
    """A dense W₀ behind the generic BaseWeight interface (not DenseWeight): the path other formats take."""

    format = "dora-test-plain"

    def __init__(self, weight):
        self.weight = weight

    shape = property(lambda self: tuple(self.weight.shape))
    dtype = property(lambda self: self.weight.dtype)
    device = property(lambda self: self.weight.device)

    def matmul_into(self, y, x2d):
        y.addmm_(x2d, self.weight.t())

    def grad_input_into(self, dx, dy):
        dx.addmm_(dy, self.weight)

    def dense(self):
        return self.weight

    def flatten(self):
        return [self.weight], []

    @classmethod
    def unflatten(cls, tensors, meta):
        return cls(tensors[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_other_base_format(backend, p, monkeypatch):
    """A base weight that is not DenseWeight goes through its own products (matmul_into,
    grad_input_into, row_norms_sq), several row chunks."""
    monkeypatch.setitem(FORMATS, PlainWeight.format, PlainWeight)
    monkeypatch.setattr(dora_module, "MIN_CHUNK_ROWS", 3)
    monkeypatch.setattr(dora_module, "CHUNK_ELEMENTS", 1)
    x, weight, b, lora_A, lora_B, magnitude = make_dora((10,), 21, 13, 4, torch.float64)
    seed = torch.tensor([77])
    try:  # DoRA is composed on the plain op: it serves what the plain op serves
        lora_kernels.lora_linear(x, PlainWeight(weight), b, lora_A, lora_B, SCALING, backend=backend)
    except RuntimeError as err:
        pytest.skip(f"the {backend} backend's plain op does not serve a non-dense base in this build: {err}")
    y = dora_linear(x, PlainWeight(weight), b, lora_A, lora_B, magnitude, SCALING, p, backend=backend, seed=seed)
    y_ref = dora_linear_eager(x, weight, b, lora_A, lora_B, magnitude, SCALING, p, seed)
    assert_close(y, y_ref, torch.float64, "y")
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, lora_A, lora_B, magnitude), grad_y)
    grads_ref = torch.autograd.grad(y_ref, (x, lora_A, lora_B, magnitude), grad_y)
    for name, got, want in zip(("grad_x", "grad_A", "grad_B", "grad_magnitude"), grads, grads_ref):
        assert_close(got, want, torch.float64, name)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_input_without_gradient(p):
    """x that needs no gradient (a first layer's input): no dX products, the others unchanged."""
    x, weight, b, lora_A, lora_B, magnitude = make_dora((7,), 16, 12, 4, torch.float64)
    x, seed = x.detach(), torch.tensor([9])
    params = (lora_A, lora_B, magnitude)
    grads = torch.autograd.grad(dora_linear(x, weight, b, *params, SCALING, p, seed=seed).sum(), params)
    want = torch.autograd.grad(dora_linear_eager(x, weight, b, *params, SCALING, p, seed).sum(), params)
    for name, got, ref in zip(("grad_A", "grad_B", "grad_magnitude"), grads, want):
        assert_close(got, ref, torch.float64, name)


def test_bias_gradient():
    x, weight, b, lora_A, lora_B, magnitude = make_dora((6,), 16, 12, 4, torch.float64)
    b.requires_grad_(True)
    for p, seed in ((0.0, None), (0.3, torch.tensor([3]))):
        grad = torch.autograd.grad(dora_linear(x, weight, b, lora_A, lora_B, magnitude, SCALING, p, seed=seed).sum(), b)
        want = torch.autograd.grad(dora_linear_eager(x, weight, b, lora_A, lora_B, magnitude, SCALING, p, seed).sum(), b)
        assert_close(grad[0], want[0], torch.float64, "grad_bias")


def test_variant_registry():
    variant = VARIANTS["dora"]
    assert variant.extra_params == ("magnitude",)
    x, weight, b, lora_A, lora_B, _ = make_dora((5,), 16, 12, 4, torch.float64)
    extra = variant.init_extra(weight, lora_A, lora_B, SCALING)
    want = torch.linalg.norm(weight + SCALING * (lora_B @ lora_A), dim=1)
    assert_close(extra["magnitude"], want, torch.float64, "magnitude")
    seed = torch.tensor([11])
    y = variant.apply(x, weight, b, lora_A, lora_B, SCALING, 0.2, seed=seed, **extra)
    assert_close(y, variant.oracle(x, weight, b, lora_A, lora_B, SCALING, 0.2, seed, **extra), torch.float64, "y")


# --- the norm and its cache ----------------------------------------------------------------------


def test_weight_norm_without_the_matrix():
    _, weight, _, lora_A, lora_B, _ = make_dora((1,), 40, 33, 5, torch.float64)
    want = torch.linalg.norm(weight + 1.7 * (lora_B @ lora_A), dim=1)
    assert_close(weight_norm(weight, lora_A, lora_B, 1.7), want, torch.float64, "norm")


def test_norm_cache_sees_new_weights():
    """Loading new base weights (in place, or a new tensor as .data) must not serve stale norms."""
    layer = nn.Linear(16, 12, dtype=torch.float64).requires_grad_(False)
    x, _, _, lora_A, lora_B, magnitude = make_dora((6,), 16, 12, 4, torch.float64)

    def check():
        y = dora_linear(x, layer.weight, None, lora_A, lora_B, magnitude, SCALING)
        assert_close(y, dora_linear_eager(x, layer.weight, None, lora_A, lora_B, magnitude, SCALING),
                     torch.float64, "y")

    check()
    layer.load_state_dict({"weight": torch.randn(12, 16, dtype=torch.float64), "bias": layer.bias})
    check()
    layer.weight.data = torch.randn(12, 16, dtype=torch.float64)
    check()
    with torch.no_grad():  # an optimizer step on the adapter
        lora_B.add_(0.5)
    check()
    with torch.no_grad():
        lora_A.mul_(-2.0)
    check()


def test_magnitude_init_is_not_the_cached_norm():
    """init_magnitude hands out its own tensor: training it must not change the cached norm."""
    x, weight, _, lora_A, lora_B, _ = make_dora((6,), 16, 12, 4, torch.float64)
    magnitude = init_magnitude(weight, lora_A, lora_B, SCALING).requires_grad_()
    y_before = dora_linear(x, weight, None, lora_A, lora_B, magnitude, SCALING)
    with torch.no_grad():
        magnitude.mul_(3.0)
    y = dora_linear(x, weight, None, lora_A, lora_B, magnitude, SCALING)
    assert_close(y, dora_linear_eager(x, weight, None, lora_A, lora_B, magnitude, SCALING), torch.float64, "y")
    assert not torch.allclose(y, y_before)


# --- PEFT's own layer ----------------------------------------------------------------------------


class SeededDropout(nn.Module):
    """Dropout with lora_kernels' mask for `seed`: PEFT's DoRA layer with the op's mask."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        k = x.shape[-1]
        return x * dropout_multiplier(int(self.seed), x.numel() // k, k, self.p, x.dtype, x.device).reshape(x.shape)


def peft_dora_layer(x, weight, b, lora_A, lora_B, magnitude, r, alpha, p):
    peft = pytest.importorskip("peft")
    n, k = weight.shape
    base = nn.Linear(k, n, bias=b is not None, dtype=weight.dtype)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["0"], use_dora=True)
    layer = peft.get_peft_model(nn.Sequential(base), config).base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        if b is not None:
            layer.base_layer.bias.copy_(b)
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
        layer.lora_magnitude_vector["default"].weight.copy_(magnitude)
    return layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                   layer.lora_magnitude_vector["default"].weight]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("p,training", [(0.0, True), (0.1, False), (0.3, True)], ids=["p0", "eval", "p0.3-op-mask"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_peft_dora_layer(backend, dtype, p, training, bias):
    """PEFT's DoRA layer (use_dora=True) and dora_linear on the same A, B, m: outputs and the
    gradients of x, A, B, m. At p > 0 PEFT's dropout module is swapped for one with the op's mask."""
    r, alpha = 4, 6
    x, weight, b, lora_A, lora_B, magnitude = make_dora((3, 5), 24, 20, r, dtype, bias)
    layer, params = peft_dora_layer(x, weight, b, lora_A, lora_B, magnitude, r, alpha, p)
    seed = torch.tensor([424242], dtype=torch.int64)
    if p > 0 and training:
        layer.lora_dropout["default"] = SeededDropout(p, seed)
    layer.train(training)
    x_peft = x.detach().clone().requires_grad_()
    y_peft = layer(x_peft)
    y = dora_linear(x, weight, b, lora_A, lora_B, magnitude, alpha / r, p, training=training, backend=backend,
                    seed=seed)
    assert_close(y, y_peft, dtype, "y")
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, lora_A, lora_B, magnitude), grad_y)
    grads_peft = torch.autograd.grad(y_peft, [x_peft] + params, grad_y)
    for name, got, want in zip(("grad_x", "grad_A", "grad_B", "grad_magnitude"), grads, grads_peft):
        assert_close(got, want, dtype, name)


def test_saved_activations_at_most_peft():
    """p = 0: dora_linear saves x, xa (M x r) and z (M x N); PEFT's layer saves more. p > 0: still
    nothing M x K beyond x (no mask, no dropped copy), where PEFT adds x′."""
    r = 8
    x, weight, b, lora_A, lora_B, magnitude = make_dora((64,), 96, 80, r, torch.float32)
    for p in (0.0, 0.1):
        layer, params = peft_dora_layer(x, weight, b, lora_A, lora_B, magnitude, r, 2 * r, p)
        layer.train()
        with SavedActivationMeter(exclude=list(layer.parameters())) as peft_meter:
            layer(x)
        with SavedActivationMeter(exclude=[weight, b, lora_A, lora_B, magnitude]) as meter:
            dora_linear(x, weight, b, lora_A, lora_B, magnitude, 2.0, p)
        ours, theirs = meter.bytes_excluding(x), peft_meter.bytes_excluding(x)
        m, n = x.shape[0], weight.shape[0]
        assert ours <= theirs, (p, ours, theirs)
        assert ours <= 4 * (m * n + m * r + 2 * n) + 64, (p, ours)  # z or w, xa, c, the norm, the seed


# --- no N x K temporary --------------------------------------------------------------------------


def allocations_at_least(fn, nbytes):
    """Sizes of the CPU allocations of at least `nbytes` that `fn` makes (torch.profiler's memory
    events, which see every allocation through torch's CPU allocator, inside ops too)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation and node.extra_fields.alloc_size >= nbytes:
                sizes.append(node.extra_fields.alloc_size)
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    return sizes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_no_weight_sized_temporary(backend, p):
    """One forward+backward on a layer whose W₀ (N x K) dwarfs every activation (M = 4): no
    allocation reaches N·K elements. The oracle, which builds W₀ + s·B·A as PEFT does, does."""
    m, k, n, r = 4, 1024, 1024, 8
    x, weight, b, lora_A, lora_B, magnitude = make_dora((m,), k, n, r, torch.float32)
    nk_bytes = n * k * 4

    def step(fn):
        def run():
            y = fn(x, weight, b, lora_A, lora_B, magnitude, SCALING, p, seed=torch.tensor([1]))
            torch.autograd.grad(y.sum(), (x, lora_A, lora_B, magnitude))
        return run

    def ours(*args, seed):
        return dora_linear(*args, backend=backend, seed=seed)

    dora_module.clear_norm_cache()  # the first call's pass over W₀ counts too
    assert allocations_at_least(step(ours), nk_bytes) == []
    assert allocations_at_least(step(dora_linear_eager), nk_bytes) != []


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: a.update(magnitude=a["magnitude"][:-1]), ValueError, r"magnitude must be \(N,\) = \(12,\), got \(11,\)"),
        (lambda a: a.update(magnitude=a["magnitude"].float()), TypeError, "magnitude must have x's dtype"),
        (lambda a: a.update(magnitude=a["magnitude"].to("meta")), ValueError, "magnitude must be on x's device"),
        (lambda a: a.update(magnitude=[1.0] * 12), TypeError, "magnitude must be a torch.Tensor"),
        (lambda a: a["weight"].requires_grad_(), ValueError, "weight must be frozen"),
        (lambda a: a.update(lora_B=a["lora_B"][:, :-1]), ValueError, "lora_B must be"),
        (lambda a: a.update(seed=torch.tensor([1.0])), TypeError, "seed must be an int64"),
    ],
    ids=["magnitude-length", "magnitude-dtype", "magnitude-device", "magnitude-type", "trainable-weight", "lora_B",
         "seed"],
)
def test_bad_input(change, error, match):
    x, weight, b, lora_A, lora_B, magnitude = make_dora((6,), 16, 12, 4, torch.float64)
    args = dict(x=x, weight=weight.clone(), bias=b, lora_A=lora_A, lora_B=lora_B, magnitude=magnitude,
                scaling=SCALING, dropout_p=0.1)
    change(args)
    with pytest.raises(error, match=match):
        dora_linear(**args)
