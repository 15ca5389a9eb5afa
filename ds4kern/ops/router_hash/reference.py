"""router_hash's reference backend (numpy, float32 arithmetic as in the kernel)."""

from __future__ import annotations

import numpy as np

from ..router.reference import EPS, score


def reference_router_hash(logits, tid2eid, token_ids, score_function, scaling_factor):
    x = np.asarray(logits).astype(np.float32)
    idx = np.asarray(tid2eid)[np.asarray(token_ids)].astype(np.int64)
    w = score(np.take_along_axis(x, idx, axis=1), score_function)
    with np.errstate(invalid="ignore"):
        if idx.shape[1] > 1:
            w = w / (w.sum(axis=1, keepdims=True, dtype=np.float32) + EPS)
        w = (w * np.float32(scaling_factor)).astype(np.float32)
    return w, idx
