"""Small numpy helpers shared by every layer: the one normalise and the one cosine."""
from __future__ import annotations

import numpy as np


def normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """`x` divided by its L2 norm along `axis` (as torch.nn.functional.normalize, without the epsilon)."""
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each pair of rows over the leading axis (a 1-D input is one row); 1.0 for two zero rows."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a2 = a.reshape(a.shape[0], -1) if a.ndim > 1 else a[None]
    b2 = b.reshape(b.shape[0], -1) if b.ndim > 1 else b[None]
    num = (a2 * b2).sum(1)
    den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)


def min_row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine over the leading axis (the whole tensor when 1-D; 1.0 when empty)."""
    if np.asarray(a).size == 0:
        return 1.0
    return float(np.min(row_cosines(a, b)))
