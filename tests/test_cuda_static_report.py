# SPDX-License-Identifier: Apache-2.0
"""CI subset of the static CUDA report (tests/cuda_static_report.py): the kernels compiled for sm_90
with ptxas -v and checked against the launch plans on an H100 — no spills in the hot kernels, shared
memory within the limit, the blocks per SM each plan assumes, a one-wave split-K A-projection. The
full report (sm_80 and sm_90, fp16 and bf16, every benchmark shape) is
`python -m tests.cuda_static_report --out bench/results/cuda-static-report.txt`."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cuda_static_report as csr  # noqa: E402


@pytest.mark.skipif(csr.nvcc_path() is None, reason="nvcc not found (set CUDA_HOME): the CUDA kernels cannot be compiled")
def test_static_report_sm90_holds():
    lines, failures = csr.report([90], dtypes=("bfloat16",), shapes=[(8192, 4096, 4096), (16, 4096, 14336)])
    assert any("project" in line for line in lines)
    assert not failures, "\n".join(failures)


def test_occupancy_model():
    # 128 registers: two blocks of 256 threads in 64K registers; 129 rounds to 136 per thread: one.
    gpu = csr.GPUS[90]
    k = csr.KernelInfo("project_kernel", "bfloat16", 4, "", 128, 0, 0, 0)
    assert csr.occupancy(k, 30 * 1024, gpu) == 2
    k.regs = 129
    assert csr.occupancy(k, 30 * 1024, gpu) == 1
    k.regs = 64
    assert csr.occupancy(k, 30 * 1024, gpu) == 4  # registers: 32 warps of 64 x 32
    assert csr.occupancy(k, 100 * 1024, gpu) == 2  # shared memory: 228 KiB / 101 KiB
