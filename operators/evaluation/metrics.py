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


def clustering_v_measure(x: np.ndarray, labels: np.ndarray, seed: int = 42, experiments: int = 10,
                         sample_size: int = 16384, batch_size: int = 512) -> float:
    """MTEB's clustering protocol (AbsTaskClustering, mteb 2.x), on the whole set: `experiments`
    samples of `sample_size` documents drawn with replacement (random.Random(seed).choices), each
    clustered by MiniBatchKMeans (k = the number of gold labels, batch 512, k-means++, one init,
    random_state=seed); the mean V-measure x 100."""
    import random

    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics import v_measure_score

    labels = np.asarray(labels)
    k = len(np.unique(labels))
    rng = random.Random(seed)
    scores = []
    for _ in range(experiments):
        idx = rng.choices(range(len(x)), k=sample_size)
        kmeans = MiniBatchKMeans(n_clusters=k, batch_size=batch_size, init="k-means++", n_init=1, random_state=seed)
        scores.append(v_measure_score(labels[idx], kmeans.fit_predict(x[idx])))
    return float(np.mean(scores) * 100)


def mteb_classification_accuracy(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int = 42,
                                 experiments: int = 10, samples_per_label: int = 8) -> float:
    """MTEB's classification protocol (AbsTaskClassification, mteb 2.x): `experiments` times,
    shuffle the training indices again (np.random.RandomState(seed), the same list each time) and
    keep the first `samples_per_label` of each label; logistic regression (max_iter=100,
    random_state=seed) on the raw embeddings; the mean test accuracy x 100."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y)
    order = list(range(len(y)))
    scores = []
    for _ in range(experiments):
        np.random.RandomState(seed).shuffle(order)
        taken: dict = {}
        keep = []
        for i in order:
            if taken.get(y[i], 0) < samples_per_label:
                taken[y[i]] = taken.get(y[i], 0) + 1
                keep.append(i)
        clf = LogisticRegression(max_iter=100, random_state=seed).fit(x[keep], y[keep])
        scores.append((clf.predict(x_test) == np.asarray(y_test)).mean())
    return float(np.mean(scores) * 100)


SENTEVAL_SEED = 1111


def senteval_order(texts: list[str], labels: np.ndarray) -> np.ndarray:
    """The order SentEval embeds a task in, and so the order its folds split: by token count
    (whitespace tokens), then label."""
    return np.asarray(sorted(range(len(texts)), key=lambda i: (len(texts[i].split()), labels[i])), dtype=np.int64)


def senteval_cv_accuracy(x: np.ndarray, y: np.ndarray, folds: int = 10, seed: int = SENTEVAL_SEED) -> float:
    """SentEval's protocol for MR, CR, SUBJ, MPQA (InnerKFoldClassifier, its scikit-learn path):
    `folds` stratified folds (shuffled, random_state 1111); in each, the L2 penalty C in
    2^-2..2^3 chosen by an inner `folds`-fold CV on the training part, then logistic regression
    with it on the whole training part; the mean test accuracy x 100 (each fold rounded to 0.01,
    as SentEval does). `x`, `y` in SentEval's order (senteval_order)."""
    from sklearn.model_selection import StratifiedKFold

    regs = [2.0 ** t for t in range(-2, 4)]
    outer = StratifiedKFold(n_splits=folds, shuffle=True, random_state=1111)
    inner = StratifiedKFold(n_splits=folds, shuffle=True, random_state=1111)
    results = []
    for train, test in outer.split(x, y):
        c = _best_c(x[train], y[train], regs, inner, seed)
        results.append(round(100 * _senteval_logreg(c, seed).fit(x[train], y[train]).score(x[test], y[test]), 2))
    return float(np.mean(results))


def senteval_split_accuracy(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, folds: int = 10,
                            seed: int = SENTEVAL_SEED) -> float:
    """SentEval's protocol for TREC (KFoldClassifier, its scikit-learn path): C in 2^-1..2^5
    chosen by a `folds`-fold stratified CV on the training split (random_state=seed), then
    logistic regression with it on the whole training split; test accuracy x 100."""
    from sklearn.model_selection import StratifiedKFold

    regs = [2.0 ** t for t in range(-1, 6)]
    c = _best_c(x, y, regs, StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed), seed)
    return float(round(100 * _senteval_logreg(c, seed).fit(x, y).score(x_test, y_test), 2))


def _senteval_logreg(c: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, random_state=seed)


def _best_c(x: np.ndarray, y: np.ndarray, regs: list[float], folds, seed: int) -> float:
    """The first C with the best mean CV accuracy (rounded to 0.01 as SentEval rounds)."""
    scores = []
    for c in regs:
        fold_scores = [_senteval_logreg(c, seed).fit(x[a], y[a]).score(x[b], y[b]) for a, b in folds.split(x, y)]
        scores.append(round(100 * float(np.mean(fold_scores)), 2))
    return regs[int(np.argmax(scores))]
