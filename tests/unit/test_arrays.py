"""pipeline.arrays.as_numpy: one conversion for numpy arrays and torch tensors."""

import subprocess
import sys

import numpy as np
import torch

from pipeline.arrays import as_numpy


def test_tensor_keeps_its_dtype_without_one_asked():
    t = torch.tensor([[1, -1], [-1, 1]], dtype=torch.int8, requires_grad=False)
    a = as_numpy(t)
    assert isinstance(a, np.ndarray) and a.dtype == np.int8
    np.testing.assert_array_equal(a, [[1, -1], [-1, 1]])


def test_with_a_dtype_tensors_go_through_float32():
    t = torch.tensor([1.0 + 1e-12, 2.0], dtype=torch.float64, requires_grad=True)
    a = as_numpy(t, np.float64)
    assert a.dtype == np.float64
    # the float32 step rounds 1 + 1e-12 to 1: what the trackers always logged
    assert a[0] == 1.0
    b = as_numpy(torch.tensor([0.5, 1.5], dtype=torch.bfloat16), np.float64)
    np.testing.assert_array_equal(b, [0.5, 1.5])


def test_non_tensors_are_np_asarray():
    x = np.arange(3, dtype=np.float32)
    assert as_numpy(x) is x
    assert as_numpy([1, 2], np.float64).dtype == np.float64


def test_imports_no_torch():
    code = "import sys, pipeline.arrays; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
