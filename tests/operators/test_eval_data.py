"""The benchmark files' reader: a malformed file names the file and the line."""

from __future__ import annotations

import pytest

from operators.eval_data import EvalDataError, read_pairs, sts_files


def test_malformed_pair_files_name_file_and_line(tmp_path):
    (tmp_path / "bad.tsv").write_text("score\tsentence1\tsentence2\n1.0\ta\tb\nnot-a-number\tc\td\n")
    with pytest.raises(EvalDataError, match=r"bad.tsv:3: score 'not-a-number'"):
        read_pairs(str(tmp_path / "bad.tsv"))
    (tmp_path / "short.tsv").write_text("score\tsentence1\tsentence2\n1.0\tonly two\n")
    with pytest.raises(EvalDataError, match=r"short.tsv:2: expected 3 tab-separated columns, got 2"):
        read_pairs(str(tmp_path / "short.tsv"))
    with pytest.raises(EvalDataError, match="benchmark file not found"):
        read_pairs(str(tmp_path / "missing.tsv"))


def test_pairs_read_as_written(tmp_path):
    (tmp_path / "sts" / "raw").mkdir(parents=True)
    (tmp_path / "sts" / "raw" / "stsb.test.tsv").write_text("score\tsentence1\tsentence2\n4.5\tA cat.\tA feline.\n0\tx\ty\n")
    pairs = read_pairs(sts_files(str(tmp_path), "stsb", "raw")["test"])
    assert (pairs.s1, pairs.s2, pairs.gold.tolist()) == (["A cat.", "x"], ["A feline.", "y"], [4.5, 0.0])
