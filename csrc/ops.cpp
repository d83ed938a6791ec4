// SPDX-License-Identifier: Apache-2.0
// Schemas of the compiled ops (kernels: csrc/cpu for CPU, csrc/cuda for CUDA) and the Python
// module lora_kernels._C. The Python op lora_kernels::lora_linear (lora_kernels/ops.py) calls
// these for its `cpu` and `cuda` backends; the contract of each is docs/design.md §1 and §4.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(lora_kernels, m) {
  // x (M, K) any strides; weight (N, K), bias (N,) or None, lora_A (r, K), lora_B (N, r)
  // contiguous, one dtype. Dropout is on iff seed (int64, shape (1,), x's device) is given.
  // Returns y (M, N) and xa = dropout(x)·lora_Aᵀ (M, r).
  m.def(
      "fused_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  // grad_y (M, N) contiguous. Returns grad_x (M, K) (empty unless compute_grad_x), grad_A (r, K),
  // grad_B (N, r); the dropout mask is regenerated from the seed, never stored.
  m.def(
      "fused_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor xa, "
      "float scaling, float dropout_p, Tensor? seed, bool compute_grad_x) -> (Tensor, Tensor, Tensor)");
  // The keep-mask (rows, cols) of the shared generator, on seed's device: for bit-exact tests.
  m.def("dropout_keep_mask(Tensor seed, int rows, int cols, float dropout_p) -> Tensor");
  // uint8 (count,): byte i holds the keep bits (bit j: lane j) of Philox group first_group + i; for
  // tests of counters past 2**32 without a tensor that large.
  m.def("dropout_keep_bits(Tensor seed, int first_group, int count, float dropout_p) -> Tensor");
}

// `import lora_kernels._C` loads this library, which registers the ops above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
