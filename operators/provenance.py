"""What a vector depends on, and the fingerprints that tie outputs and artifacts to it.

extraction fingerprint: model identity (hub commit or weights hash), dtype, max length, long-document
    mode, extraction settings. A whitening artifact is fitted for exactly one of these.
config fingerprint: the extraction fingerprint plus the post-processing chain, the artifact's
    hash and the output dtype. It travels into every output shard and decides re-runs.
"""

from __future__ import annotations

from operators import __version__
from operators.config import PipelineConfig, fingerprint
from operators.models import ResolvedModel
from operators.postprocess import ArtifactError, Fit, load_artifact
from operators.vectors import output_dimension


def extraction_identity(cfg: PipelineConfig, resolved: ResolvedModel) -> dict:
    return {
        "model": dict(
            resolved.identity, dtype=cfg.model.dtype, max_length=resolved.max_length,
            long_documents=cfg.model.long_documents, window_stride=cfg.model.window_stride,
        ),
        "extraction": cfg.extraction.model_dump(mode="json"),
    }


def check_artifact(cfg: PipelineConfig, resolved: ResolvedModel) -> tuple[Fit | None, dict | None, str | None]:
    """Load the whitening artifact the config names and refuse one fitted for another model or
    extraction config. (None, None, None) when the chain needs no artifact."""
    from operators.storage import get_fs

    steps = cfg.postprocess_steps()
    if not any(s["op"] != "normalize" for s in steps):
        return None, None, None
    fs, path = get_fs(cfg.whitening.artifact, cfg.whitening.storage)
    fit, meta, sha = load_artifact(fs, path)
    want = fingerprint(extraction_identity(cfg, resolved))
    if meta.get("extraction_fingerprint") != want:
        raise ArtifactError(
            f"whitening.artifact: {cfg.whitening.artifact} was fitted for another model or extraction config "
            f"(model {meta.get('model', {}).get('name')!r}, pooling {meta.get('extraction', {}).get('pooling')!r}, "
            f"fingerprint {meta.get('extraction_fingerprint')}); this config's is {want}. "
            "Fit one for this config with pipelines/fit_whitening.py"
        )
    d = len(fit.mean)
    for s in steps:
        if s["op"] == "whiten" and s.get("k") and s["k"] > d:
            raise ArtifactError(f"whitening.k={s['k']} exceeds the embedding dimension {d}")
        if s["op"] == "remove_top_pcs" and not 0 < s["d"] < d:
            raise ArtifactError(f"postprocess: remove_top_pcs={s['d']} must be between 1 and {d - 1}")
    return fit, meta, sha


def build_provenance(cfg: PipelineConfig, resolved: ResolvedModel, artifact_sha: str | None) -> tuple[dict, str]:
    identity = extraction_identity(cfg, resolved)
    steps = cfg.postprocess_steps()
    config = dict(
        identity,
        extraction_fingerprint=fingerprint(identity),
        postprocess=steps,
        whitening_artifact=None if artifact_sha is None else {"uri": cfg.whitening.artifact, "sha256": artifact_sha},
        output_dtype=cfg.output.dtype,
    )
    fp = fingerprint(config)
    provenance = dict(
        config,
        package="corpus-embed",
        package_version=__version__,
        model_type=resolved.model_type,
        dimension=output_dimension(steps, resolved.dimension),
        normalized=bool(steps[-1]["op"] == "normalize") if steps else cfg.extraction.normalize,
        config_fingerprint=fp,
    )
    return provenance, fp
