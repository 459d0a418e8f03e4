"""Post-processing fitted at corpus scale: whitening, removing top principal components, z-score,
L2 normalisation. Pure numpy (fitting) and torch (applying); no Ray.

Fitting keeps only mergeable moments: the count n, the sum s = sum_i x_i and the sum of outer
products P = sum_i x_i x_i^T, in float64. Partitions merge by adding them, so memory is O(d^2)
whatever the corpus size, and the result equals one pass over the concatenated embeddings:

    mu    = s / n
    Sigma = (P - n mu mu^T) / (n - 1)              (the unbiased covariance, as numpy.cov)
    Sigma = U diag(lam) U^T                        (eigenvalues sorted descending)

BERT-whitening (Su et al., 2021): W = U diag(lam)^(-1/2), keep the first k columns, and
x' = (x - mu) W has mean 0 and identity covariance over the fit corpus (k dims). ZCA whitening
rotates back, W = U diag(lam)^(-1/2) U^T, so x' stays in the original basis. Eigenvalues are
floored at eps * lam_max: all-MiniLM-L6-v2's final LayerNorm leaves directions with variance
near 1e-16, and dividing by their square roots would turn rounding noise into huge coordinates.

All-but-the-top (Mu & Viswanath, ICLR 2018): x' = (x - mu) - sum_{j<D} (u_j . (x - mu)) u_j.
Z-score: x' = (x - mu) / sqrt(diag(Sigma) + eps).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

STEPS = ("whiten", "remove_top_pcs", "zscore", "normalize")
FITTED = {"whiten", "remove_top_pcs", "zscore"}


class ArtifactError(RuntimeError):
    """A whitening artifact that cannot be used: corrupt, truncated, or fitted for another config."""


@dataclass
class Moments:
    n: int
    sum: np.ndarray  # (d,) float64
    outer: np.ndarray  # (d, d) float64

    @classmethod
    def zeros(cls, d: int) -> "Moments":
        return cls(0, np.zeros(d), np.zeros((d, d)))

    @classmethod
    def of(cls, x: np.ndarray) -> "Moments":
        x = np.asarray(x, dtype=np.float64)
        return cls(len(x), x.sum(axis=0), x.T @ x)

    def merge(self, other: "Moments") -> "Moments":
        return Moments(self.n + other.n, self.sum + other.sum, self.outer + other.outer)

    def mean(self) -> np.ndarray:
        return self.sum / self.n

    def covariance(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError("need at least 2 embeddings to estimate a covariance")
        mu = self.mean()
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return (cov + cov.T) / 2


@dataclass
class Fit:
    """mu and the eigendecomposition of Sigma: everything the fitted steps need."""

    mean: np.ndarray  # (d,)
    eigvals: np.ndarray  # (d,) descending
    eigvecs: np.ndarray  # (d, d), columns
    variances: np.ndarray  # diag(Sigma)
    count: int

    @classmethod
    def from_moments(cls, m: Moments) -> "Fit":
        cov = m.covariance()
        lam, u = np.linalg.eigh(cov)
        order = np.argsort(lam)[::-1]
        return cls(m.mean(), np.clip(lam[order], 0, None), u[:, order], np.diag(cov).copy(), m.n)

    def whitening_matrix(self, k: int | None = None, method: str = "pca", eps: float = 1e-6) -> np.ndarray:
        d = len(self.eigvals)
        k = d if k is None else k
        if not 1 <= k <= d:
            raise ValueError(f"whitening.k={k} must be between 1 and the dimension {d}")
        lam = np.maximum(self.eigvals[:k], eps * self.eigvals[0])
        w = self.eigvecs[:, :k] / np.sqrt(lam)
        return w @ self.eigvecs[:, :k].T if method == "zca" else w


class PostProcessor(torch.nn.Module):
    """Applies an ordered chain of steps on the device the vectors are on."""

    def __init__(self, steps: list[dict], fit: Fit | None):
        super().__init__()
        self.ops: list[tuple[str, dict]] = []
        for step in steps:
            op = step["op"]
            if op in FITTED and fit is None:
                raise ArtifactError(f"post-processing step {op} needs a fitted artifact (whitening.artifact)")
            mean = None if fit is None else torch.tensor(fit.mean, dtype=torch.float32)
            if op == "whiten":
                w = fit.whitening_matrix(step.get("k"), step.get("method", "pca"), step.get("eps", 1e-6))
                self.ops.append((op, {"mean": mean, "w": torch.tensor(w, dtype=torch.float32)}))
            elif op == "remove_top_pcs":
                u = torch.tensor(fit.eigvecs[:, : int(step["d"])], dtype=torch.float32)
                self.ops.append((op, {"mean": mean, "u": u}))
            elif op == "zscore":
                std = torch.tensor(np.sqrt(fit.variances + step.get("eps", 1e-12)), dtype=torch.float32)
                self.ops.append((op, {"mean": mean, "std": std}))
            elif op == "normalize":
                self.ops.append((op, {}))
            else:
                raise ValueError(f"unknown post-processing step {op!r}; valid: {', '.join(STEPS)}")

    def to(self, device):  # noqa: D401 - keep tensors with the model
        self.ops = [(op, {k: v.to(device) for k, v in p.items()}) for op, p in self.ops]
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        for op, p in self.ops:
            if op == "whiten":
                x = (x - p["mean"]) @ p["w"]
            elif op == "remove_top_pcs":
                c = x - p["mean"]
                x = c - (c @ p["u"]) @ p["u"].T
            elif op == "zscore":
                x = (x - p["mean"]) / p["std"]
            else:
                x = torch.nn.functional.normalize(x, p=2, dim=-1)
        return x


# ---------------------------------------------------------------------------------------------
# Artifacts: safetensors (no pickle) + JSON metadata


def save_artifact(fs, path: str, fit: Fit, metadata: dict) -> str:
    """Write the fit to `path` (any fsspec filesystem); return the artifact's sha256."""
    from safetensors.numpy import save

    meta = dict(metadata, count=fit.count, dimension=len(fit.mean))
    blob = save(
        {  # safetensors writes raw buffers: strided views must be made contiguous first
            k: np.ascontiguousarray(v, dtype=np.float64)
            for k, v in {"mean": fit.mean, "eigvals": fit.eigvals, "eigvecs": fit.eigvecs, "variances": fit.variances}.items()
        },
        metadata={"corpus_embed": json.dumps(meta, sort_keys=True)},
    )
    with fs.open(path, "wb") as f:
        f.write(blob)
    return hashlib.sha256(blob).hexdigest()


def load_artifact(fs, path: str) -> tuple[Fit, dict, str]:
    """(fit, metadata, sha256). Raises ArtifactError for a missing, corrupt or truncated file."""
    from safetensors.numpy import load

    try:
        with fs.open(path, "rb") as f:
            blob = f.read()
    except FileNotFoundError as e:
        raise ArtifactError(f"whitening.artifact: {path} does not exist; fit one with pipelines/fit_whitening.py") from e
    try:
        tensors = load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(json.loads(blob[8 : 8 + header_len])["__metadata__"]["corpus_embed"])
        fit = Fit(tensors["mean"], tensors["eigvals"], tensors["eigvecs"], tensors["variances"], int(meta["count"]))
    except Exception as e:
        raise ArtifactError(
            f"whitening.artifact: {path} is corrupt or truncated ({type(e).__name__}: {e}); fit it again"
        ) from e
    d = len(fit.mean)
    if fit.eigvecs.shape != (d, d) or fit.eigvals.shape != (d,) or not np.isfinite(fit.eigvecs).all():
        raise ArtifactError(f"whitening.artifact: {path} is corrupt: inconsistent shapes or non-finite values")
    return fit, meta, hashlib.sha256(blob).hexdigest()
