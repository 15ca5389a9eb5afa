"""``import ds4kern`` stays light: ml_dtypes (~0.7 s) loads on first use, and the lazy bfloat16
stand-in works wherever the dtype did."""

import subprocess
import sys

import numpy as np


def test_import_does_not_import_ml_dtypes():
    code = "import sys, ds4kern; print('ml_dtypes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]


def test_bfloat16_stand_in_is_the_dtype_where_it_goes():
    import ml_dtypes

    from ds4kern.core.arrays import BFLOAT16, FLOAT_DTYPES, dtype_name

    real = np.dtype(ml_dtypes.bfloat16)
    assert np.dtype(BFLOAT16) == real and BFLOAT16 == real and real == BFLOAT16 and not (BFLOAT16 != real)
    assert np.empty(3, BFLOAT16).dtype == real and np.ones(2, np.float32).astype(BFLOAT16).dtype == real
    assert np.zeros(4, np.uint16).view(BFLOAT16).dtype == real
    assert real in FLOAT_DTYPES and np.dtype(np.int32) not in FLOAT_DTYPES and BFLOAT16 != np.float32
    assert {real: 1}[BFLOAT16] == 1 and hash(BFLOAT16) == hash(real)
    assert BFLOAT16.itemsize == 2 and BFLOAT16.name == "bfloat16" and str(BFLOAT16) == "bfloat16"
    assert dtype_name(real) == "bfloat16" and dtype_name(BFLOAT16) == "bfloat16"
