# SPDX-License-Identifier: Apache-2.0
"""The test helpers themselves: a failing comparison must fail with a readable message."""

import pytest
import torch

from tests.helpers import assert_close


def test_assert_close_reports_nan_as_worst_element():
    expected = torch.zeros(2, 3)
    actual = expected.clone()
    actual[1, 2] = float("nan")
    with pytest.raises(AssertionError, match=r"worst at \(1, 2\): nan vs 0.0; NaN in actual: True"):
        assert_close(actual, expected, torch.float32, "y")


def test_assert_close_baseline_tolerates_same_dtype_error_only():
    expected = torch.zeros(4, dtype=torch.float64)
    baseline = torch.full((4,), 0.3, dtype=torch.float64)
    assert_close(torch.full((4,), 0.5), expected, torch.bfloat16, "y", baseline=baseline)  # <= 2x baseline
    with pytest.raises(AssertionError, match="y"):
        assert_close(torch.full((4,), 0.8), expected, torch.bfloat16, "y", baseline=baseline)
