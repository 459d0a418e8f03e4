"""Post-processing fitted at corpus scale: whitening, removing top principal components, z-score,
L2 normalisation. Pure numpy (the steps, fitting, artifacts) and torch (applying, imported only by
`PostProcessor`, on the embedding actors); no Ray.

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
from dataclasses import asdict, dataclass
from typing import ClassVar, Union

import numpy as np

# -- the steps ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Whiten:
    k: int | None = None  # dimensions kept (pca); None: all
    method: str = "pca"  # pca | zca
    eps: float = 1e-6  # eigenvalue floor, relative to the largest
    op: ClassVar[str] = "whiten"
    fitted: ClassVar[bool] = True

    def dimension(self, d: int) -> int:
        return int(self.k) if self.method == "pca" and self.k else d


@dataclass(frozen=True)
class RemoveTopPCs:
    d: int  # principal components removed
    op: ClassVar[str] = "remove_top_pcs"
    fitted: ClassVar[bool] = True

    def dimension(self, d: int) -> int:
        return d


@dataclass(frozen=True)
class ZScore:
    op: ClassVar[str] = "zscore"
    fitted: ClassVar[bool] = True
    eps: ClassVar[float] = 1e-12

    def dimension(self, d: int) -> int:
        return d


@dataclass(frozen=True)
class Normalize:
    op: ClassVar[str] = "normalize"
    fitted: ClassVar[bool] = False

    def dimension(self, d: int) -> int:
        return d


Step = Union[Whiten, RemoveTopPCs, ZScore, Normalize]
STEP_TYPES: dict[str, type] = {t.op: t for t in (Whiten, RemoveTopPCs, ZScore, Normalize)}
STEPS = tuple(STEP_TYPES)


def step_json(step: Step) -> dict:
    """The step as its provenance records it (and the config fingerprint hashes): {"op": ..., fields}."""
    return {"op": step.op, **asdict(step)}


def output_dimension(steps, d: int) -> int:
    """The vectors' dimension after `steps` (PCA whitening to k keeps k)."""
    for s in steps:
        d = s.dimension(d)
    return d


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


def moments_row(m: Moments):
    """One Arrow row for `m`: its sums as raw float64 buffers (d and d x d values)."""
    import pyarrow as pa

    return pa.table({
        "n": pa.array([m.n], pa.int64()),
        "sum": pa.array([np.ascontiguousarray(m.sum, dtype=np.float64).tobytes()], pa.binary()),
        "outer": pa.array([np.ascontiguousarray(m.outer, dtype=np.float64).tobytes()], pa.binary()),
    })


def merge_moment_tables(tables, d: int) -> Moments:
    """The sum of every row of `tables` (moments_row's layout), one table at a time: O(d^2) memory."""
    total = Moments.zeros(d)
    for t in tables:
        for n, s, o in zip(t.column("n").to_pylist(), t.column("sum").to_pylist(), t.column("outer").to_pylist()):
            total = total.merge(Moments(int(n), np.frombuffer(s, dtype=np.float64), np.frombuffer(o, dtype=np.float64).reshape(d, d)))
    return total


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


class PostProcessor:
    """Applies an ordered chain of steps: in torch, on the device the vectors are on (the
    embedding actors), or in numpy (numpy=True: a sweep's driver, which never imports torch)."""

    def __init__(self, steps, fit: Fit | None, numpy: bool = False):
        if numpy:
            tensor = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
        else:
            import torch

            tensor = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        self.numpy = numpy
        self.ops: list[tuple[str, dict]] = []
        for step in steps:
            if step.fitted and fit is None:
                raise ArtifactError(f"post-processing step {step.op} needs a fitted artifact (whitening.artifact)")
            mean = None if fit is None else tensor(fit.mean)
            if isinstance(step, Whiten):
                self.ops.append((step.op, {"mean": mean, "w": tensor(fit.whitening_matrix(step.k, step.method, step.eps))}))
            elif isinstance(step, RemoveTopPCs):
                self.ops.append((step.op, {"mean": mean, "u": tensor(fit.eigvecs[:, : int(step.d)])}))
            elif isinstance(step, ZScore):
                self.ops.append((step.op, {"mean": mean, "std": tensor(np.sqrt(fit.variances + step.eps))}))
            elif isinstance(step, Normalize):
                self.ops.append((step.op, {}))
            else:
                raise ValueError(f"unknown post-processing step {step!r}; valid: {', '.join(STEPS)}")

    def to(self, device) -> "PostProcessor":
        self.ops = [(op, {k: v.to(device) for k, v in p.items()}) for op, p in self.ops]
        return self

    def __call__(self, x):
        if self.numpy:
            return self._apply(np.asarray(x, dtype=np.float32), _l2_numpy)
        import torch

        with torch.no_grad():
            return self._apply(x.float(), lambda v: torch.nn.functional.normalize(v, p=2, dim=-1))

    def _apply(self, x, l2):
        for op, p in self.ops:
            if op == "whiten":
                x = (x - p["mean"]) @ p["w"]
            elif op == "remove_top_pcs":
                c = x - p["mean"]
                x = c - (c @ p["u"]) @ p["u"].T
            elif op == "zscore":
                x = (x - p["mean"]) / p["std"]
            else:
                x = l2(x)
        return x


def _l2_numpy(x: np.ndarray) -> np.ndarray:
    """torch.nn.functional.normalize's L2 normalisation (norms floored at 1e-12), in numpy."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


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
