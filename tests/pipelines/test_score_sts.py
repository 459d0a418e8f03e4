"""pipelines/score_sts.py: the number it prints is sentence-transformers' own on the same pairs,
and a bad file or config exits 2 before the model loads."""

from __future__ import annotations

import re

import numpy as np
from scipy.stats import spearmanr

from pipelines.score_sts import main
from tests.helpers import make_pairs


def test_minilm_score_equals_sentence_transformers_encode(tmp_path, minilm_path, capsys):
    from sentence_transformers import SentenceTransformer

    data = make_pairs(tmp_path / "pairs.tsv")
    assert main(["--data", str(data)]) == 0
    out = capsys.readouterr().out
    got = float(re.search(r"spearman x100 = (-?[\d.]+)", out).group(1))
    rows = [line.split("\t") for line in data.read_text().splitlines()[1:]]
    st = SentenceTransformer(minilm_path, device="cpu")
    a, b = st.encode([r[1] for r in rows]), st.encode([r[2] for r in rows])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert abs(got - spearmanr(cos, [float(r[0]) for r in rows]).correlation * 100) < 0.01
    assert "(20 pairs, " in out and "done: 1 files scored" in out


def test_a_bad_file_or_config_exits_2(tmp_path, capsys):
    (tmp_path / "bad.tsv").write_text("score\tsentence1\tsentence2\nnot-a-number\ta\tb\n")
    assert main(["--data", str(tmp_path / "bad.tsv")]) == 2
    assert "bad.tsv:2: score 'not-a-number'" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "bad.tsv"), "--set", "model.nmae=x"]) == 2
    assert "unknown key" in capsys.readouterr().err
