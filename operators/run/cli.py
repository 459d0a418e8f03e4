"""The one command line of every pipeline: `--config` (repeatable where a pipeline compares
configurations), `--set KEY=VALUE`, the resolved config logged with credentials redacted, and one
table from exception to exit code:

    0  done
    1  a run that failed part-way (some shards not committed, a sink failed, anything unexpected)
    2  a problem found before any work: configuration, input, model, artifact, benchmark data, a live lease
    3  the quality gate failed: nothing published
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable

from operators import __version__
from operators.config.loading import load_config
from operators.config.schema import ConfigError, resolved_config_text
from operators.config.secrets import redact_text
from operators.evaluation.eval_data import EvalDataError
from operators.io.sinks import SinkError
from operators.io.sources import SourceError
from operators.io.storage import InputError
from operators.io.writers import IncompleteShardError
from operators.methods.postprocess import ArtifactError
from operators.model.resolution import ModelLoadError
from operators.run.gate import GateError
from operators.run.lease import LeaseError

logger = logging.getLogger("corpus_embed")


class Terminated(Exception):
    """SIGTERM (a scheduler, a pod being stopped): the run stops as after any failure, cleanly:
    what was committed is recorded, the run report written, the lease given back."""


EXIT_CODES: tuple[tuple[tuple[type[BaseException], ...], int], ...] = (
    ((ConfigError, InputError, ModelLoadError, ArtifactError, EvalDataError, SourceError, LeaseError), 2),
    ((GateError,), 3),
    ((IncompleteShardError, SinkError, Terminated), 1),
)


def exit_code(e: BaseException) -> int:
    for classes, code in EXIT_CODES:
        if isinstance(e, classes):
            return code
    return 1


def main(
    description: str,
    argv: list[str] | None,
    work: Callable,
    summarize: Callable[[object], str],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    compare: bool = False,
) -> int:
    """Parse the command line, load and log the config(s), run `work(cfg, args)` (with compare=True
    `work(cfgs, args)`, one config per --config) and print `summarize(result)`. Returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if compare:
        p.add_argument("--config", action="append", default=[], help="YAML config (repeat to compare); default: configs/default.yaml")
    else:
        p.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set input.uri=s3://bucket/corpus/ (repeatable; for every config)",
    )
    if add_arguments:
        add_arguments(p)
    args = p.parse_args(argv)
    restore = stop_on_sigterm()
    try:
        paths = (args.config or [None]) if compare else [args.config]
        cfgs = []
        for path in paths:
            cfg = load_config(path, args.set)
            logger.info("corpus-embed %s, resolved config%s:\n%s", __version__, f" {path}" if path else "", resolved_config_text(cfg))
            cfgs.append(cfg)
        result = work(cfgs if compare else cfgs[0], args)
    except Exception as e:  # one line, no traceback; the code says what kind of failure it was
        known = any(isinstance(e, classes) for classes, _ in EXIT_CODES)
        if not known:
            logger.debug("unexpected error", exc_info=True)
        return _fail(e, exit_code(e), "" if known else f"{type(e).__name__}: ")
    finally:
        restore()
    print(summarize(result), flush=True)
    return 0


def stop_on_sigterm():
    """Turn SIGTERM into Terminated in the main thread for the length of a command; returns what
    puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise Terminated(f"stopped by {signal.Signals(signum).name}; re-run to finish")

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _fail(e: BaseException, code: int, prefix: str = "") -> int:
    print(f"error: {redact_text(prefix + str(e))}", file=sys.stderr, flush=True)
    return code


class RedactingFilter(logging.Filter):
    """Credentials never reach a log line, whichever operator formatted it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
