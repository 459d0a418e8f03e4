"""Post-processing math against direct numpy computations."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
import torch

from operators.methods.postprocess import (
    ArtifactError,
    Fit,
    Moments,
    Normalize,
    PostProcessor,
    RemoveTopPCs,
    Whiten,
    ZScore,
    load_artifact,
    save_artifact,
)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(16, 16)) * np.linspace(3, 0.1, 16)  # anisotropic, like raw BERT vectors
    return rng.normal(size=(3000, 16)) @ mix + rng.normal(size=16) * 5


def apply(steps, fit, x):
    return PostProcessor(steps, fit)(torch.tensor(x, dtype=torch.float32)).double().numpy()


def test_merged_moments_equal_one_pass_and_numpy(data):
    parts = np.array_split(data, 7)
    merged = Moments.zeros(16)
    for p in parts:
        merged = merged.merge(Moments.of(p))
    one = Moments.of(data)
    assert merged.n == one.n == len(data)
    np.testing.assert_allclose(merged.sum, one.sum, rtol=1e-12)
    np.testing.assert_allclose(merged.outer, one.outer, rtol=1e-12)
    np.testing.assert_allclose(merged.mean(), data.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(merged.covariance(), np.cov(data, rowvar=False), rtol=1e-8, atol=1e-10)


def test_whitening_matches_a_direct_numpy_computation(data):
    fit = Fit.from_moments(Moments.of(data))
    cov = np.cov(data, rowvar=False)
    lam, u = np.linalg.eigh(cov)
    lam, u = lam[::-1], u[:, ::-1]
    np.testing.assert_allclose(fit.eigvals, lam, rtol=1e-8)
    w = u / np.sqrt(lam)
    got = fit.whitening_matrix(eps=0)
    np.testing.assert_allclose(np.abs(got), np.abs(w), rtol=1e-6)  # eigenvector signs are arbitrary


@pytest.mark.parametrize("k", [None, 8])
def test_whitened_fit_data_has_zero_mean_and_identity_covariance(data, k):
    fit = Fit.from_moments(Moments.of(data))
    out = apply([Whiten(k=k)], fit, data)
    dim = k or 16
    assert out.shape == (len(data), dim)
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-3)  # tolerance: float32 application
    np.testing.assert_allclose(np.cov(out, rowvar=False), np.eye(dim), atol=1e-3)


def test_zca_keeps_the_basis_and_whitens(data):
    fit = Fit.from_moments(Moments.of(data))
    w = fit.whitening_matrix(method="zca")
    np.testing.assert_allclose(w, w.T, atol=1e-10)
    out = apply([Whiten(method="zca")], fit, data)
    np.testing.assert_allclose(np.cov(out, rowvar=False), np.eye(16), atol=1e-3)


def test_eigenvalue_floor_keeps_near_singular_spectra_finite():
    rng = np.random.default_rng(1)
    low_rank = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 12))  # rank 4 in 12 dims
    fit = Fit.from_moments(Moments.of(low_rank))
    assert fit.eigvals[4:].max() < 1e-10 * fit.eigvals[0]
    w = fit.whitening_matrix(eps=1e-6)
    assert np.isfinite(w).all() and np.abs(w).max() < 1e4 / np.sqrt(fit.eigvals[0])
    out = apply([Whiten(k=4)], fit, low_rank)
    np.testing.assert_allclose(np.cov(out, rowvar=False), np.eye(4), atol=1e-3)


def test_remove_top_pcs_zscore_normalize(data):
    fit = Fit.from_moments(Moments.of(data))
    out = apply([RemoveTopPCs(3)], fit, data)
    np.testing.assert_allclose(out @ fit.eigvecs[:, :3], 0, atol=1e-3)
    centered = data - data.mean(axis=0)
    top = fit.eigvecs[:, :3]
    np.testing.assert_allclose(out, centered - centered @ top @ top.T, atol=1e-3)
    z = apply([ZScore(), Normalize()], fit, data)
    want = (data - data.mean(0)) / data.std(0, ddof=1)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(z, want, atol=1e-5)
    with pytest.raises(ArtifactError, match="needs a fitted artifact"):
        PostProcessor([Whiten()], None)


def test_artifact_round_trip_and_refusals(tmp_path, data):
    fs = fsspec.filesystem("file")
    fit = Fit.from_moments(Moments.of(data))
    path = str(tmp_path / "white.safetensors")
    sha = save_artifact(fs, path, fit, {"extraction_fingerprint": "abc", "corpus": {"source": "x"}})
    back, meta, sha2 = load_artifact(fs, path)
    assert sha == sha2 and meta["extraction_fingerprint"] == "abc" and meta["count"] == len(data)
    np.testing.assert_array_equal(back.eigvecs, fit.eigvecs)
    blob = open(path, "rb").read()
    (tmp_path / "cut").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        load_artifact(fs, str(tmp_path / "cut"))
    (tmp_path / "junk").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        load_artifact(fs, str(tmp_path / "junk"))
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(fs, str(tmp_path / "missing"))


def test_moments_travel_as_float64_buffers_and_merge_exactly(data):
    """The fit's actors ship each batch's moments as two raw float64 buffers (d and d x d values),
    not as Python lists: the merge on the driver equals one pass over all rows."""
    import pyarrow as pa

    from operators.methods.postprocess import merge_moment_tables, moments_row

    rows = [moments_row(Moments.of(part)) for part in np.array_split(data, 5)]
    assert rows[0].schema.field("outer").type == pa.binary() and len(rows[0].column("outer")[0].as_py()) == 16 * 16 * 8
    merged, one = merge_moment_tables(rows, 16), Moments.of(data)
    assert merged.n == len(data)
    np.testing.assert_allclose(merged.outer, one.outer, rtol=1e-12)
    np.testing.assert_allclose(merged.sum, one.sum, rtol=1e-12)
