"""Scoring embeddings. Pure numpy/scipy, no Ray."""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of `a` with the same row of `b`."""
    a = a / np.clip(np.linalg.norm(a, axis=1, keepdims=True), 1e-12, None)
    b = b / np.clip(np.linalg.norm(b, axis=1, keepdims=True), 1e-12, None)
    return (a * b).sum(axis=1)


def sts_spearman(emb1: np.ndarray, emb2: np.ndarray, gold: np.ndarray) -> float:
    """Spearman correlation x 100 between pair cosine similarity and gold scores (SentEval/MTEB)."""
    return float(spearmanr(cosine_rows(emb1, emb2), gold).correlation * 100)
