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


def clustering_v_measure(x: np.ndarray, labels: np.ndarray, seed: int = 42) -> float:
    """MTEB's clustering protocol: MiniBatchKMeans with k = the number of gold labels
    (batch size 500), V-measure x 100 against the gold labels."""
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics import v_measure_score

    k = len(np.unique(labels))
    pred = MiniBatchKMeans(n_clusters=k, batch_size=500, n_init=3, random_state=seed).fit_predict(x)
    return float(v_measure_score(labels, pred) * 100)


def _logreg(seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))


def classification_accuracy(
    x: np.ndarray, y: np.ndarray, x_test: np.ndarray | None = None, y_test: np.ndarray | None = None,
    folds: int = 10, seed: int = 42,
) -> float:
    """Logistic regression on frozen (standardised) embeddings, accuracy x 100: on the given
    test split, or the mean over stratified k folds (SentEval's protocol for MR/CR/SUBJ/MPQA)."""
    if x_test is not None:
        return float((_logreg(seed).fit(x, y).predict(x_test) == y_test).mean() * 100)
    from sklearn.model_selection import StratifiedKFold

    scores = []
    for train, test in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y):
        scores.append((_logreg(seed).fit(x[train], y[train]).predict(x[test]) == y[test]).mean())
    return float(np.mean(scores) * 100)
