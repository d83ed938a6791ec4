// SPDX-License-Identifier: Apache-2.0
// The compiled ops' library (schemas and their contracts: schema.h; kernels: csrc/cpu for CPU,
// csrc/cuda for CUDA) and the Python module lora_kernels._C. The Python op lora_kernels::lora_linear
// (lora_kernels/ops.py) calls these for its `cpu` and `cuda` backends.
#include <Python.h>
#include <torch/library.h>

#include "schema.h"

TORCH_LIBRARY(lora_kernels, m) {
  m.def(lora_kernels::schema::kFusedForward);
  m.def(lora_kernels::schema::kFusedBackward);
  m.def(lora_kernels::schema::kFusedForwardStacked);
  m.def(lora_kernels::schema::kFusedBackwardStacked);
  m.def(lora_kernels::schema::kDropoutKeepMask);
  m.def(lora_kernels::schema::kDropoutKeepBits);
  m.def(lora_kernels::schema::kDecode4bit);
  m.def(lora_kernels::schema::kPerRowForward);
  m.def(lora_kernels::schema::kGroupRows);
}

// `import lora_kernels._C` loads this library, which registers the ops above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
