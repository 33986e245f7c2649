"""Typed results a user reads: zero-shot predictions with their labels attached.

Each converts to the plain numpy array it wraps (`np.asarray(result)`), so code written against
the arrays keeps working: `np.asarray(pipe.classify(...)).argmax(1)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Prediction:
    """One image's zero-shot probabilities over `labels` (they sum to 1)."""

    labels: tuple[str, ...]
    probs: np.ndarray  # [len(labels)]

    @property
    def label(self) -> str:
        """The most probable label (the first of equals)."""
        return self.labels[int(np.argmax(self.probs))]

    @property
    def score(self) -> float:
        """The most probable label's probability."""
        return float(np.max(self.probs))

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The `k` most probable (label, probability) pairs, most probable first."""
        order = np.argsort(-self.probs, kind="stable")[:k]
        return [(self.labels[i], float(self.probs[i])) for i in order]

    def as_dict(self) -> dict[str, float]:
        """{label: probability} for every label."""
        return {lb: float(p) for lb, p in zip(self.labels, self.probs)}

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.probs, dtype=dtype)


@dataclass(frozen=True)
class Classification:
    """Zero-shot probabilities of N images over `labels`: `probs` is [N, len(labels)].

    Index or iterate it for each image's Prediction; `np.asarray(result)` is the probability matrix.
    """

    labels: tuple[str, ...]
    probs: np.ndarray  # [N, len(labels)]

    @property
    def best_labels(self) -> list[str]:
        """The most probable label of each image."""
        return [self.labels[i] for i in np.argmax(self.probs, axis=1)]

    @property
    def shape(self) -> tuple[int, ...]:
        """The probability matrix's shape, (images, labels)."""
        return self.probs.shape

    def __len__(self) -> int:
        return len(self.probs)

    def __getitem__(self, i: int) -> Prediction:
        return Prediction(self.labels, self.probs[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.probs, dtype=dtype)
