"""The one command line: every pipeline's exit codes from one table, credentials kept out of logs."""

from __future__ import annotations

import logging

import pytest

from operators.config.schema import ConfigError
from operators.evaluation.eval_data import EvalDataError
from operators.io.sinks import SinkError
from operators.io.storage import InputError
from operators.io.writers import DuplicateIdError, IncompleteShardError
from operators.methods.postprocess import ArtifactError
from operators.model.resolution import ModelLoadError
from operators.run import cli
from operators.run.gate import GateError
from operators.run.lease import LeaseError


@pytest.mark.parametrize("error,code", [
    (ConfigError("x"), 2), (InputError("x"), 2), (ModelLoadError("x"), 2), (ArtifactError("x"), 2), (EvalDataError("x"), 2),
    (LeaseError("x"), 2), (GateError("x"), 3), (IncompleteShardError("x"), 1), (DuplicateIdError("x"), 1), (SinkError("x"), 1),
    (PermissionError("x"), 1), (RuntimeError("x"), 1),
])
def test_each_failure_maps_to_its_exit_code_and_one_line(error, code, capsys):
    def work(cfg, args):
        raise error

    assert cli.main("d", [], work, str) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    known = type(error) not in (PermissionError, RuntimeError)  # anything unexpected is named by its class
    assert err[0] == ("error: x" if known else f"error: {type(error).__name__}: x")


def test_a_bad_config_exits_2_before_work_and_extra_arguments_reach_it(capsys):
    seen = []
    assert cli.main("d", ["--set", "model.nmae=x"], lambda cfg, args: seen.append(cfg), str) == 2
    assert "model.nmae: unknown key" in capsys.readouterr().err and not seen

    def add(p):
        p.add_argument("--docs", type=int, required=True)

    assert cli.main("d", ["--docs", "3"], lambda cfg, args: args.docs * 2, lambda r: f"got {r}", add) == 0
    assert capsys.readouterr().out.strip() == "got 6"
    assert cli.main("d", ["--config", "configs/default.yaml", "--config", "configs/nightly.yaml"],
                    lambda cfgs, args: len(cfgs), str, compare=True) == 0
    assert capsys.readouterr().out.strip() == "2"


def test_credentials_never_reach_a_log_line(caplog):
    record = logging.LogRecord("corpus_embed", logging.INFO, __file__, 1, "reading %s", ("s3://AKIAXXXX:secret123@bucket/x",), None)
    cli.RedactingFilter().filter(record)
    assert "secret123" not in record.getMessage() and "bucket/x" in record.getMessage()
