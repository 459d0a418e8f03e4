"""Sweeps without Ray: heads from one forward equal separate single-head embedders; a sweep makes
one pass per forward group (the fit corpus included, once); every variant's scores equal the
evaluation stage's on that variant's config alone, its whitening artifact accepted by the corpus
pipeline's checks; labels say what changed; bad sweeps fail before any work."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import yaml

from operators.config.loading import load_config
from operators.config.schema import DEFAULT_CONFIG, ConfigError
from operators.evaluation.scoring import evaluate, rows_for
from operators.evaluation.sweep import describe, load_sweep, run_sweep
from operators.evaluation.sweep_reports import write_best, write_sweep_reports
from operators.methods.pooling import Head
from operators.model.embed import Embedder
from operators.model.prepare import prepare
from tests.helpers import fit_corpus, make_bench, spec_for, texts_of_mixed_length


def local_embed_fn_for(calls: list):
    """The sweep's embedding function in this process: the group's heads on one Embedder."""

    def embed_fn_for(cfg, prepared):
        embedder = Embedder(prepared.spec())

        def fn(keys, texts):
            calls.append(len(texts))
            for i in range(0, len(texts), 50):
                yield keys[i:i + 50], embedder.embed_texts(texts[i:i + 50]).vectors

        return fn

    return embed_fn_for


def single_embed_fn(cfg, prepared):
    embedder = Embedder(prepared.spec())

    def fn(keys, texts):
        for i in range(0, len(texts), 50):
            yield keys[i:i + 50], embedder.embed_texts(texts[i:i + 50]).vectors

    return fn


@pytest.mark.parametrize("model", ["minilm_path", "tiny_llama"])
def test_heads_from_one_forward_equal_single_head_embedders(model, request):
    name = request.getfixturevalue(model)
    decoder = model == "tiny_llama"
    heads = [Head("mean", (-1,)), Head("max", (1, -1)), Head("mean", (0,), exclude_special_tokens=True),
             Head("last_token" if decoder else "cls", (-2, -1), normalize=True), Head("mean", (-1,), exclude_special_tokens=True, normalize=True)]
    texts = texts_of_mixed_length(40) + ["", "short"]
    kw = {"padding_side": "left"} if decoder else {}
    base = spec_for(name, model_kw=kw)
    together = Embedder(replace(base, heads=tuple(heads))).embed_texts(texts).vectors
    d = base.resolved.dimension
    assert together.shape == (len(texts), d * len(heads))
    for h, head in enumerate(heads):
        alone = Embedder(spec_for(name, model_kw=kw, pooling=head.pooling, layers=head.layers,
                                  exclude_special_tokens=head.exclude_special_tokens, normalize=head.normalize)).embed_texts(texts).vectors
        np.testing.assert_allclose(together[:, h * d:(h + 1) * d], alone, atol=1e-5, err_msg=str(head))
    assert not np.allclose(together[:, :d], together[:, 2 * d:3 * d])  # the heads differ


def write_sweep(tmp_path, tiny_bert, bench, **extra) -> str:
    sweep = {
        "base": {"extends": str(DEFAULT_CONFIG), "extraction": {"normalize": False}},
        "set": {"model.name": tiny_bert, "eval.mirror": str(bench), "eval.folds": 3,
                "eval.tasks": ["sts/stsb", "STS13", "SciFact", "clustering/banking77", "classification/mr"],
                "whitening.corpus": fit_corpus(tmp_path / "fit"), "whitening.max_sentences": 120},
        "rank_by": "sts/stsb",
        "axes": {"extraction.layers": [[-1], [0, -1]], "extraction.pooling": ["mean", "cls"]},
        "variants": [
            {"postprocess": ["whiten"]}, {"postprocess": [{"whiten": 8}]}, {"postprocess": [{"remove_top_pcs": 2}]},
            {"postprocess": ["zscore", "normalize"], "extraction.layers": [0, -1]},
            {"extraction.exclude_special_tokens": True},
            {"extraction.template": 'This sentence : "{text}" means'},
        ],
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return str(path)


def test_a_sweep_is_one_pass_per_forward_and_scores_as_each_config_alone(tmp_path, tiny_bert):
    bench = make_bench(tmp_path / "bench")
    out = tmp_path / "out"
    sweep = load_sweep(write_sweep(tmp_path, tiny_bert, bench), output=str(out))
    labels = [v.label for v in sweep.variants]
    assert labels[:4] == ["base", "pooling=cls", "layers=[0, -1]", "pooling=cls, layers=[0, -1]"]
    assert labels[4:] == ["whiten", "whiten k=8", "abtt D=2", "layers=[0, -1], zscore + l2", "no special tokens",
                          "template='This sentence : \"{tex...'"]
    calls: list = []
    result = run_sweep(sweep, lambda cfg: prepare(cfg, postprocess=False), local_embed_fn_for(calls), str(out))
    write_sweep_reports(sweep, result, str(out))
    texts = result["passes"][0]["texts"]
    # two forward groups (the template changes the input): the first pass covers the benchmark and,
    # once, the fit corpus that every whitening and ABTT variant is fitted from
    assert [p["heads"] for p in result["passes"]] == [5, 1]
    assert calls == [texts + 120, texts]
    assert result["passes"][0]["fit_texts"] == 120
    ranked = [r["rank_score"] for r in result["variants"]]
    assert ranked == sorted(ranked, reverse=True) and len(ranked) == len(sweep.variants)

    # each variant scores as the evaluation stage scores its config alone, with the artifact the sweep wrote
    for v in sweep.variants:
        prepared = prepare(v.cfg)  # checks the artifact's fingerprint against the variant's extraction
        alone = evaluate(v.cfg, prepared, single_embed_fn(v.cfg, prepared), str(tmp_path / "alone"))
        mine = next(r for r in result["variants"] if r["name"] == v.label)
        want, got = rows_for(alone), rows_for(mine)
        assert want.keys() == got.keys()
        for k in want:
            # the vectors differ by float noise (the batches pad differently): STS agrees to 1e-3, or to
            # 0.05 where whitening a 32-dim random model scales its flattest directions up by ~1e3; k-means
            # and logistic regression on this tiny bench's 30-60 points can flip one assignment: a point
            tol = (0.05 if v.cfg.postprocess_steps() else 1e-3) if k.startswith("STS") else 1.0
            assert got[k] == pytest.approx(want[k], abs=tol), (v.label, k)

    # the reports and the best config, which the corpus pipeline loads and prepares as it is
    saved = json.loads((out / "results.json").read_text())
    assert saved["variants"][0]["name"] == result["variants"][0]["name"]
    md = (out / "results.md").read_text()
    assert "| 1 | " + result["variants"][0]["name"] in md and "abtt D=2" in md
    assert (out / "results.png").stat().st_size > 10_000
    best = load_config(str(out / "best" / "config.yaml"))
    assert describe(best, sweep.base) == result["variants"][0]["name"]
    prepare(best)

    calls.clear()  # a rerun: everything cached, nothing embedded, the same ranking
    again = run_sweep(sweep, lambda cfg: prepare(cfg, postprocess=False), local_embed_fn_for(calls), str(out))
    assert calls == [] and [r["name"] for r in again["variants"]] == [r["name"] for r in result["variants"]]


def test_bad_sweeps_fail_before_any_work(tmp_path, tiny_bert):
    bench = make_bench(tmp_path / "bench")
    cases = [
        ({"axes": {"extraction.pooling": ["mean", "bogus"]}}, "pooling"),
        ({"rank_by": "sts/sickr"}, "rank_by"),
        ({"axes": {"eval.folds": [3, 4]}}, "same eval settings"),
        ({"axes": {"extraction.layers": [[-1], []]}}, ""),
        ({"oops": 1}, "unknown keys"),
    ]
    for extra, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            load_sweep(write_sweep(tmp_path, tiny_bert, bench, **extra), output=str(tmp_path / "o"))
    path = write_sweep(tmp_path, tiny_bert, bench)
    spec = yaml.safe_load(open(path))
    spec["set"].pop("whitening.corpus")
    open(path, "w").write(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="whitening.corpus"):
        load_sweep(path, output=str(tmp_path / "o"))
    # out of range for this model: found when the group is resolved, before its pass
    sweep = load_sweep(write_sweep(tmp_path, tiny_bert, bench, variants=[{"extraction.layers": [7]}]), output=str(tmp_path / "o"))
    calls: list = []
    with pytest.raises(ConfigError, match="out of range"):
        run_sweep(sweep, lambda cfg: prepare(cfg, postprocess=False), local_embed_fn_for(calls), str(tmp_path / "o"))
    assert calls == []


def test_labels_say_what_changed():
    base = load_config(None, [])
    assert describe(base, base) == "base"
    cfg = load_config(None, ["extraction.layers=[0]", "model.init=random", "extraction.demonstrations=[a, b]"])
    assert describe(cfg, base) == "init=random, layers=[0], demos=2"


def test_what_shares_a_forward_pass(tmp_path):
    """Heads of one model and input share a pass; a T5 decoder mode, a prompt, another seed do not."""
    from operators.evaluation.sweep import plan_groups

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "set": {"model.name": "google-t5/t5-base", "eval.tasks": ["sts/stsb"]},
        "axes": {"extraction.pooling": ["encoder_mean", "encoder_first", "decoder_first"], "extraction.layers": [[-1], [0, -1]]},
        "variants": [{"extraction.pooling": "encoder_mean", "extraction.instruction": "query: "},
                     {"extraction.pooling": "encoder_mean", "model.init": "random", "model.init_seed": 3}],
    }))
    groups = plan_groups(load_sweep(str(path), output=str(tmp_path / "o")))
    sizes = sorted((len(g.variants), len(g.heads)) for g in groups)
    assert sizes == [(1, 1), (1, 1), (2, 2), (4, 4)]  # decoder_first apart from the encoder modes


def test_sweep_reports_hold_no_secret_and_labels_inject_nothing(tmp_path, tiny_bert):
    """A credential in a sweep's URIs reaches no report, and a label holding a newline (a template
    variant) injects no line into best/config.yaml (written by a YAML emitter, labels as JSON strings)."""
    bench = make_bench(tmp_path / "bench")
    secret = "wJalrXUtnFEMI/K7MDENG"
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "base": {"extends": str(DEFAULT_CONFIG)},
        "set": {"model.name": tiny_bert, "eval.mirror": str(bench), "eval.tasks": ["sts/stsb"],
                "input.uri": f"s3://AKIAEXAMPLEKEYID:{secret}@corpus/in/"},
        "variants": [{"extraction.template": "\nextends: /etc\n{text}"}],
    }))
    out = tmp_path / "out"
    sweep = load_sweep(str(sweep_file), output=str(out))
    result = run_sweep(sweep, lambda cfg: prepare(cfg, postprocess=False), local_embed_fn_for([]), str(out))
    write_sweep_reports(sweep, result, str(out))
    best = out / "best" / "config.yaml"
    for path in (out / "results.json", out / "results.md", best):
        text = path.read_text()
        assert secret not in text and "AKIAEXAMPLEKEYID" not in text, path
    assert secret not in json.dumps(result)
    tree = yaml.safe_load(best.read_text())
    assert "extends" not in tree and tree["input"]["uri"] == "s3://***@corpus/in/"
    assert all(line.startswith("#") for line in best.read_text().splitlines()[:2])
    templated = next(v for v in sweep.variants if "template" in v.label)
    write_best(templated, tmp_path / "b2")  # whichever won: the newline label written as a best config
    text = (tmp_path / "b2" / "config.yaml").read_text()
    assert "extends" not in yaml.safe_load(text) and "\\nextends" in text.splitlines()[0]


def test_sweeps_and_configs_are_bounded_before_anything_expands(tmp_path, tiny_bert):
    """7 axes of 10 values (10^7 variants) fail at once naming max_variants; a YAML alias bomb in
    extraction.demonstrations fails naming the cap, in a sweep and in a config file alike."""
    import time

    axes = {f"extraction.{k}": list(range(10)) for k in ("a", "b", "c", "d", "e", "f", "g")}
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump({"set": {"model.name": tiny_bert}, "axes": axes}))
    started = time.time()
    with pytest.raises(ConfigError, match=r"10000000 variants \(10 x 10 x 10 x 10 x 10 x 10 x 10 axes, 0 listed\), over max_variants = 10000"):
        load_sweep(str(path))
    assert time.time() - started < 5
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    (tmp_path / "bomb.yaml").write_text(bomb + "set: {extraction.demonstrations: *i}\n")  # 9^9 strings
    with pytest.raises(ConfigError, match=r"bomb.yaml: expands to more than 200000 values .*CORPUS_EMBED_MAX_YAML_VALUES"):
        load_sweep(str(tmp_path / "bomb.yaml"))
    (tmp_path / "bomb-config.yaml").write_text(bomb + "extraction: {demonstrations: *i}\n")
    with pytest.raises(ConfigError, match=r"expands to more than 200000 values"):
        load_config(tmp_path / "bomb-config.yaml")
