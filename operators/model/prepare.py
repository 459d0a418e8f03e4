"""Preparation, once per run and before any work: resolve the model, check the whitening artifact,
build the provenance and the config fingerprint, and take the model's tokenizer in portable form.

Every pipeline starts with `prepare(cfg)`; the embedding actors, the tokenize stage and the
evaluation all work from the `Prepared` it returns. Loading a model's config and tokenizer takes
transformers, which imports torch: when this process has not loaded them yet (a job's driver),
preparation runs in a short-lived child process, so the driver stays small and torch-free.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from operators.config.schema import PipelineConfig
from operators.model.resolution import ResolvedModel
from operators.model.tokenize import EmbedSpec, PortableTokenizer


@dataclass(frozen=True)
class Prepared:
    """What a run embeds with, resolved and checked."""

    cfg: PipelineConfig
    resolved: ResolvedModel
    provenance: dict  # travels into every vector shard's footer
    fingerprint: str  # the config fingerprint: decides re-runs, names versions and caches
    tokenizer: PortableTokenizer  # the driver's tokenizer, for workers that load no transformers
    artifact_sha256: str | None = None  # the whitening artifact applied, if any
    postprocess: bool = True  # False: raw extraction (what a whitening fit reads)
    heads: tuple = ()  # several raw heads from one forward (EmbedSpec.heads): a sweep

    @property
    def dimension(self) -> int:
        return int(self.provenance["dimension"])

    def spec(self, num_threads: int | None = None) -> EmbedSpec:
        """The EmbedSpec the actors are built from."""
        return EmbedSpec.from_config(self.cfg, self.resolved, num_threads=num_threads, postprocess=self.postprocess, heads=self.heads)


def prepare(cfg: PipelineConfig, postprocess: bool = True, isolate: bool | None = None) -> Prepared:
    """Resolve and check everything the config embeds with. Raises ConfigError, ModelLoadError or
    ArtifactError before any work. isolate=None: in a child process when this one has not loaded
    transformers (a process that has gains nothing from one)."""
    if isolate is None:
        isolate = "transformers" not in sys.modules
    if not isolate:
        return prepare_here(cfg, postprocess)
    # a fresh interpreter (not multiprocessing: its spawn would import the caller's __main__ again)
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    got = subprocess.run(
        [sys.executable, "-c", "from operators.model.prepare import _serve; _serve()"],
        input=pickle.dumps((cfg, postprocess)), stdout=subprocess.PIPE, env=env, check=False,
    )
    try:
        ok, value = pickle.loads(got.stdout)
    except Exception:
        raise RuntimeError(f"the preparation process exited with {got.returncode} and no result (its errors are above)") from None
    if not ok:
        raise value
    return value


def _serve() -> None:
    """The child's side of prepare(): the config on stdin, (ok, Prepared or the exception) on stdout."""
    cfg, postprocess = pickle.loads(sys.stdin.buffer.read())
    out, sys.stdout = sys.stdout.buffer, sys.stderr  # whatever the loading prints goes to stderr
    try:
        result = (True, prepare_here(cfg, postprocess))
    except Exception as e:
        result = (False, e)
    out.write(pickle.dumps(result))
    out.flush()


def check_calibration_corpus(cfg: PipelineConfig) -> None:
    """Static int8 calibrates on the actors: its corpus must yield text now, before any work
    (InputError naming the setting), not fail there with 're-run to retry it'."""
    from operators.config.schema import StorageConfig
    from operators.config.secrets import redact_text
    from operators.io.readers import read_fit_corpus
    from operators.io.storage import InputError

    m = cfg.model
    if m.quantization != "int8" or not m.calibration_corpus:
        return
    try:
        found = read_fit_corpus(m.calibration_corpus, "lines", 1, StorageConfig(), cfg.eval.mirror)
    except InputError as e:
        raise InputError(f"model.calibration_corpus: {redact_text(str(e))}") from e
    if not found:
        raise InputError(f"model.calibration_corpus: {redact_text(m.calibration_corpus)} holds no text to calibrate on")


def prepare_here(cfg: PipelineConfig, postprocess: bool = True) -> Prepared:
    from operators.model.provenance import build_provenance, check_artifact
    from operators.model.resolution import resolve_model
    from operators.model.tokenize import load_tokenizer

    resolved = resolve_model(cfg.model, cfg.extraction)
    check_calibration_corpus(cfg)
    artifact = check_artifact(cfg, resolved) if postprocess else None
    sha = artifact.sha256 if artifact else None
    provenance, fp = build_provenance(cfg, resolved, sha)
    if not postprocess:  # raw extraction: the dimension before any post-processing
        provenance = dict(provenance, dimension=resolved.dimension)
    tokenizer = PortableTokenizer.from_transformers(load_tokenizer(EmbedSpec.from_config(cfg, resolved, postprocess=postprocess)))
    return Prepared(cfg, resolved, provenance, fp, tokenizer, sha, postprocess)
