"""Metrics against independent computations: Spearman as Pearson of ranks in numpy, and sklearn/scipy."""

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.cluster import MiniBatchKMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import v_measure_score
from sklearn.preprocessing import StandardScaler

from operators.metrics import classification_accuracy, clustering_v_measure, cosine_rows, sts_spearman


def test_sts_spearman_is_pearson_of_ranks_of_cosines():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    gold = rng.uniform(0, 5, size=50)
    cos = np.array([x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)])
    np.testing.assert_allclose(cosine_rows(a, b), cos, atol=1e-12)
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731 (no ties in random floats)
    want = np.corrcoef(ranks(cos), ranks(gold))[0, 1] * 100
    assert abs(sts_spearman(a, b, gold) - want) < 1e-9


def test_metrics_against_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)) * 4
    labels = np.repeat(np.arange(4), 50)
    x = centers[labels] + rng.normal(size=(200, 8))
    pred = MiniBatchKMeans(n_clusters=4, batch_size=500, n_init=3, random_state=42).fit_predict(x)
    assert clustering_v_measure(x, labels) == pytest.approx(v_measure_score(labels, pred) * 100)
    y = (x[:, 0] > 0).astype(int)
    xs = StandardScaler().fit(x[:150]).transform
    direct = (LogisticRegression(max_iter=2000, random_state=42).fit(xs(x[:150]), y[:150]).predict(xs(x[150:])) == y[150:]).mean()
    assert classification_accuracy(x[:150], y[:150], x[150:], y[150:]) == pytest.approx(direct * 100)
    a, b, gold = rng.normal(size=(30, 5)), rng.normal(size=(30, 5)), rng.uniform(size=30)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert sts_spearman(a, b, gold) == pytest.approx(spearmanr(cos, gold).correlation * 100)
