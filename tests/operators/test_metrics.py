"""Metrics against an independent computation: Spearman as Pearson of ranks, in numpy."""

import numpy as np

from operators.metrics import cosine_rows, sts_spearman


def test_sts_spearman_is_pearson_of_ranks_of_cosines():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    gold = rng.uniform(0, 5, size=50)
    cos = np.array([x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)])
    np.testing.assert_allclose(cosine_rows(a, b), cos, atol=1e-12)
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731 (no ties in random floats)
    want = np.corrcoef(ranks(cos), ranks(gold))[0, 1] * 100
    assert abs(sts_spearman(a, b, gold) - want) < 1e-9
