"""Preparation, once per run and before any work: resolve the model, check the whitening artifact,
build the provenance and the config fingerprint, and take the model's tokenizer in portable form.

Every pipeline starts with `prepare(cfg)`; the embedding actors, the tokenize stage and the
evaluation all work from the `Prepared` it returns. Loading a model's config and tokenizer takes
transformers, which imports torch: when this process has not loaded them yet (a job's driver),
preparation runs in a short-lived child process, so the driver stays small and torch-free.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from operators.config import PipelineConfig
from operators.models import ResolvedModel
from operators.tokenize import EmbedSpec, PortableTokenizer


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

    @property
    def dimension(self) -> int:
        return int(self.provenance["dimension"])

    def spec(self, num_threads: int | None = None) -> EmbedSpec:
        """The EmbedSpec the actors are built from."""
        return EmbedSpec.from_config(self.cfg, self.resolved, num_threads=num_threads, postprocess=self.postprocess)


def prepare(cfg: PipelineConfig, postprocess: bool = True) -> Prepared:
    """Resolve and check everything the config embeds with. Raises ConfigError, ModelLoadError or
    ArtifactError before any work; isolated in a child process when this one has no transformers."""
    if "transformers" in sys.modules:
        return prepare_here(cfg, postprocess)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(prepare_here, cfg, postprocess).result()


def prepare_here(cfg: PipelineConfig, postprocess: bool = True) -> Prepared:
    from operators.models import resolve_model
    from operators.provenance import build_provenance, check_artifact
    from operators.tokenize import load_tokenizer

    resolved = resolve_model(cfg.model, cfg.extraction)
    artifact = check_artifact(cfg, resolved) if postprocess else None
    sha = artifact.sha256 if artifact else None
    provenance, fp = build_provenance(cfg, resolved, sha)
    if not postprocess:  # raw extraction: the dimension before any post-processing
        provenance = dict(provenance, dimension=resolved.dimension)
    tokenizer = PortableTokenizer.from_transformers(load_tokenizer(EmbedSpec.from_config(cfg, resolved, postprocess=postprocess)))
    return Prepared(cfg, resolved, provenance, fp, tokenizer, sha, postprocess)
