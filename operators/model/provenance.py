"""What a vector depends on, and the fingerprints that tie outputs and artifacts to it.

extraction fingerprint: model identity (hub commit or weights hash), dtype, max length, long-document
    mode, extraction settings. A whitening artifact is fitted for exactly one of these.
config fingerprint: the extraction fingerprint plus the post-processing chain, the artifact's
    hash and the output dtype. It travels into every output shard and decides re-runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from operators import __version__
from operators.config.schema import ModelConfig, PipelineConfig, fingerprint
from operators.methods.postprocess import ArtifactError, Fit, Normalize, RemoveTopPCs, Whiten, load_artifact, output_dimension, step_json
from operators.model.resolution import ResolvedModel


def engine_identity(model: ModelConfig) -> dict:
    """The engine and quantization, where they are not torch's float32: fingerprints from before
    engines existed stay valid, and int8 vectors never share one with float32 vectors."""
    if model.engine == "torch":
        return {}
    out = {"engine": model.engine, "quantization": model.quantization}
    if model.quantization == "int8" and model.calibration_corpus:
        out["calibration"] = {"corpus": model.calibration_corpus, "rows": model.calibration_rows}
    return out


def extraction_identity(cfg: PipelineConfig, resolved: ResolvedModel) -> dict:
    return {
        "model": dict(
            resolved.identity, dtype=cfg.model.dtype, max_length=resolved.max_length,
            long_documents=cfg.model.long_documents, window_stride=cfg.model.window_stride,
            **engine_identity(cfg.model),
            **({"init": "random", "init_seed": cfg.model.init_seed} if cfg.model.init == "random" else {}),
        ),
        "extraction": cfg.extraction.model_dump(mode="json"),
    }


@dataclass(frozen=True)
class Artifact:
    """A whitening artifact checked against the config that applies it."""

    fit: Fit
    metadata: dict
    sha256: str


def check_artifact(cfg: PipelineConfig, resolved: ResolvedModel) -> Artifact | None:
    """Load the whitening artifact the config names and refuse one fitted for another model or
    extraction config. None when the chain needs no artifact."""
    from operators.io.storage import get_fs

    steps = cfg.postprocess_steps()
    if not any(s.fitted for s in steps):
        return None
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
    check_steps(steps, len(fit.mean))
    return Artifact(fit, meta, sha)


def check_steps(steps, d: int) -> None:
    """Each post-processing step against the embedding dimension `d` (ArtifactError)."""
    for s in steps:
        if isinstance(s, Whiten) and s.k and s.k > d:
            raise ArtifactError(f"whitening.k={s.k} exceeds the embedding dimension {d}")
        if isinstance(s, RemoveTopPCs) and not 0 < s.d < d:
            raise ArtifactError(f"postprocess: remove_top_pcs={s.d} must be between 1 and {d - 1}")


def build_provenance(cfg: PipelineConfig, resolved: ResolvedModel, artifact_sha: str | None) -> tuple[dict, str]:
    identity = extraction_identity(cfg, resolved)
    steps = cfg.postprocess_steps()
    config = dict(
        identity,
        extraction_fingerprint=fingerprint(identity),
        postprocess=[step_json(s) for s in steps],
        whitening_artifact=None if artifact_sha is None else {"uri": cfg.whitening.artifact, "sha256": artifact_sha},
        output_dtype=cfg.output.dtype,
    )
    fp = fingerprint(config)
    provenance = dict(
        config,
        package="corpus-embed",
        package_version=__version__,
        model_type=resolved.model_type,
        engine={"name": cfg.model.engine, "quantization": cfg.model.quantization},
        dimension=output_dimension(steps, resolved.dimension),
        normalized=isinstance(steps[-1], Normalize) if steps else cfg.extraction.normalize,
        config_fingerprint=fp,
    )
    return provenance, fp
