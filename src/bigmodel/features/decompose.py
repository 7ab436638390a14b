"""PCA, TruncatedSVD and IncrementalPCA in torch, with scikit-learn's estimator contract and results.

Reading order: the randomized SVD both randomized solvers use, the projection shared by PCA and
IncrementalPCA (transform, inverse_transform, nn.Module form), then the three estimators. Computations
run in the input's dtype on the input's device; attributes and results come back as numpy when the
input was numpy, as tensors when it was a tensor.
"""

from __future__ import annotations

import mmap
import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from bigmodel.features.base import Estimator, same_kind, to_tensor

SOLVERS = ("auto", "full", "covariance_eigh", "randomized")


def _on_numpy(t: torch.Tensor) -> bool:
    """Whether t can go through numpy's BLAS: a dense CPU float32/float64 tensor outside autograd."""
    floating = t.dtype in (torch.float32, torch.float64)
    return t.device.type == "cpu" and not t.is_sparse and not t.requires_grad and floating


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for dense or sparse a. On CPU, dense products go through numpy's matmul: its OpenBLAS runs
    the tall-and-skinny products of the randomized SVD 1.3-1.5x faster than torch's MKL on AMD CPUs."""
    if a.is_sparse:
        return torch.sparse.mm(a, b)
    if _on_numpy(a) and _on_numpy(b) and a.dtype == b.dtype:
        return torch.from_numpy(a.numpy() @ b.numpy())
    return a @ b


def _basis(Y: torch.Tensor) -> torch.Tensor:
    """A basis of the columns of Y (n, w) for the power iterations, by Cholesky-QR: one (w, w) Gram matrix
    and one triangular solve, several times cheaper than Householder QR on a tall Y. The iterations only
    need a well-scaled basis (scikit-learn uses an LU factor there); the final step uses a true QR. Falls
    back to QR when Y is too ill-conditioned for the Cholesky factor of its Gram matrix."""
    L, info = torch.linalg.cholesky_ex(_gram(Y).double())
    if int(info) != 0 or not bool(torch.isfinite(L).all()):
        return torch.linalg.qr(Y).Q
    return torch.linalg.solve_triangular(L.t().to(Y.dtype), Y, upper=True, left=False)  # Y R^-1, R = L^T


def randomized_svd(
    M: torch.Tensor, k: int, n_oversamples: int = 10, n_iter: int = 4, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k SVD of M (n, d), dense or sparse, by a randomized range finder with power iterations (Halko et
    al. 2011): returns U (n, k), S (k,), Vt (k, d).

    Each power iteration reads M twice. When M is dense and tall enough that one product M.T @ M costs less
    than those passes, the iterations run on that (d, d) Gram matrix instead (`_gram_range`), and only
    the final Rayleigh-Ritz step reads M again.
    """
    g = torch.Generator(device=M.device).manual_seed(0 if seed is None else seed)
    width = min(k + n_oversamples, *M.shape)
    omega = torch.randn(M.shape[1], width, generator=g, dtype=M.dtype, device=M.device)
    if _gram_pays(M, width, n_iter):
        found = _gram_range(M, k, omega, n_iter)
        if isinstance(found, tuple):
            return found
        omega = found  # the Gram matrix's subspace, a better start for the sampled iterations
    Mt = M.t()
    Q = _matmul(M, omega)  # (n, width)
    for _ in range(n_iter):  # power iterations sharpen the spectrum; re-normalising keeps them stable
        Q = _basis(Q)
        Q = _basis(_matmul(Mt, Q))  # (d, width)
        Q = _matmul(M, Q)
    Q, _ = torch.linalg.qr(Q)
    B = _matmul(Mt, Q).t()  # (width, d) = Q.T @ M
    Ub, S, Vt = torch.linalg.svd(B, full_matrices=False)
    return (Q @ Ub)[:, :k], S[:k], Vt[:k]


def _gram_pays(M: torch.Tensor, width: int, n_iter: int) -> bool:
    """Whether forming M.T @ M is cheaper than the power iterations' passes over M (multiply-adds per
    element of M: d/2 for a CPU syrk or d for a GPU product, plus one final pass; against 2 per
    iteration and 2 more, each of `width` columns). Dense, tall, and at most 4096 features."""
    n, d = M.shape
    if M.is_sparse or n < d or d > 4096:
        return False
    if M.is_cuda and M.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return False  # TF32 products: the Gram matrix would resolve only ~3 digits
    gram = (d / 2 if _on_numpy(M) else d) + width
    return gram < (2 * n_iter + 2) * width


def _gram_range(
    M: torch.Tensor, k: int, omega: torch.Tensor, n_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | torch.Tensor:
    """The randomized SVD with its power iterations on G = M.T @ M (d, d).

    The sampled algorithm's right subspace is span(G^(n_iter + 1) omega); it is built here in float64 from
    G, then M is projected on it once, Y = M V (n, width), and the SVD of Y gives the singular values and
    vectors, as the final step of the sampled algorithm does (so their precision is M's, not the squared
    one of G). G itself is only as precise as M's dtype relative to its largest eigenvalue: when the k-th
    singular value is so small that G cannot resolve its direction (sigma_k^2 < 1000 eps sigma_1^2),
    returns the subspace found, V (d, width), as the start of the sampled iterations the caller then runs.
    """
    G = _gram(M).double()  # (d, d)
    V = omega.double()
    for _ in range(n_iter + 1):
        V = torch.linalg.qr(G @ V).Q  # (d, width)
    Qy, R = torch.linalg.qr(_matmul(M, V.to(M.dtype)))  # (n, width), (width, width)
    Ur, S, Wt = torch.linalg.svd(R)
    if S[k - 1] ** 2 < 1000 * torch.finfo(M.dtype).eps * S[0] ** 2:
        return V.to(M.dtype)
    Vt = (Wt.double() @ V.t()).to(M.dtype)  # (width, d)
    return (Qy @ Ur)[:, :k], S[:k], Vt[:k]


def _svd_right(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and right singular vectors of M (n, d), without the (n, k) left vectors.

    For tall M, a Householder QR first (only R is formed) leaves the same S and Vt in a (d, d) problem:
    several times faster than an SVD of M that also builds U, and as backward stable.
    """
    if M.shape[0] > M.shape[1]:
        M = torch.linalg.qr(M, mode="r").R
    _, S, Vt = torch.linalg.svd(M, full_matrices=False)
    return S, Vt


def _gram(X: torch.Tensor) -> torch.Tensor:
    """X.T @ X (d, d). On CPU through numpy's matmul, which recognises a product with its own transpose and
    calls BLAS syrk: half the multiplications of the general product torch would run."""
    if _on_numpy(X):
        a = X.numpy()
        return torch.from_numpy(a.T @ a)
    return X.t() @ X


def flip_signs(Vt: torch.Tensor, U: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Deterministic signs (scikit-learn's svd_flip, V-based): each row of Vt has its largest |entry| > 0."""
    idx = Vt.abs().argmax(dim=1)
    signs = torch.sign(Vt[torch.arange(Vt.shape[0]), idx])
    signs[signs == 0] = 1
    return Vt * signs[:, None], (U * signs[None, :] if U is not None else None)


class ProjectionModule(nn.Module):
    """A fitted PCA as a frozen layer: (..., d) -> (..., k) = (x - mean) @ components.T / scale."""

    mean: torch.Tensor
    components: torch.Tensor
    scale: torch.Tensor

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("components", components.clone())
        self.register_buffer("scale", scale.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) @ self.components.t()) / self.scale


class _Projection(Estimator):
    """transform / inverse_transform / to_module for estimators that learn mean_ and components_."""

    whiten: bool
    _mean: torch.Tensor
    _components: torch.Tensor
    _variance: torch.Tensor

    def _scale(self) -> torch.Tensor:
        if self.whiten:
            return self._variance.sqrt().clamp(min=torch.finfo(self._variance.dtype).tiny)
        return torch.ones_like(self._variance)

    def transform(self, X: Any) -> Any:
        self._check_fitted("components_")
        t, as_numpy = to_tensor(X)
        if t.shape[1] != self._components.shape[1]:
            raise ValueError(
                f"X has {t.shape[1]} features, but {type(self).__name__} was fitted with {self._components.shape[1]}"
            )
        out = self.to_module().to(t.device, t.dtype)(t)
        return same_kind(out, as_numpy)

    def fit_transform(self, X: Any, y: Any = None) -> Any:
        return self.fit(X).transform(X)

    def inverse_transform(self, Z: Any) -> Any:
        self._check_fitted("components_")
        t, as_numpy = to_tensor(Z, "Z")
        k = self._components.shape[0]
        if t.shape[1] != k:
            raise ValueError(f"Z has {t.shape[1]} columns, expected n_components_={k}")
        c, m, s = (v.to(t.device, t.dtype) for v in (self._components, self._mean, self._scale()))
        return same_kind((t * s) @ c + m, as_numpy)

    def to_module(self) -> ProjectionModule:
        """The fitted projection as a frozen nn.Module (buffers, no parameters) for use inside a model."""
        self._check_fitted("components_")
        return ProjectionModule(self._mean, self._components, self._scale())

    def _publish(self, as_numpy: bool, **attrs: torch.Tensor | int) -> None:
        for name, value in attrs.items():
            setattr(self, name, same_kind(value, as_numpy) if isinstance(value, torch.Tensor) else value)


def _n_components(value: int | float | None, n: int, d: int, name: str) -> int | float:
    limit = min(n, d)
    if value is None:
        return limit
    if isinstance(value, float):
        if not 0 < value < 1:
            raise ValueError(f"{name}={value}: a float must be a variance fraction in (0, 1)")
        return value
    if not 1 <= int(value) <= limit:
        raise ValueError(f"{name}={value} must be between 1 and min(n_samples, n_features) = {limit}")
    return int(value)


class PCA(_Projection):
    """Principal component analysis: full SVD or randomized solver, optional whitening.

    n_components: int, a variance fraction in (0, 1) (keep the fewest components reaching it; full solver),
    or None (all). iterated_power: power iterations of the randomized solver; "auto" is scikit-learn's rule
    (7 when n_components < 10% of min(n_samples, n_features), else 4).
    Learned: mean_, components_ (k, d), explained_variance_, explained_variance_ratio_,
    singular_values_, noise_variance_, n_components_, n_samples_, n_features_in_.
    """

    mean_: Any
    components_: Any
    explained_variance_: Any
    explained_variance_ratio_: Any
    singular_values_: Any
    noise_variance_: Any
    n_components_: Any

    def __init__(
        self,
        n_components: int | float | None = None,
        *,
        whiten: bool = False,
        svd_solver: str = "auto",
        n_oversamples: int = 10,
        iterated_power: int | str = "auto",
        random_state: int | None = None,
    ) -> None:
        self.n_components = n_components
        self.whiten = whiten
        self.svd_solver = svd_solver
        self.n_oversamples = n_oversamples
        self.iterated_power = iterated_power
        self.random_state = random_state

    def _restore_private(self) -> None:
        self._mean, self._components, self._variance = (
            _t(self.mean_),
            _t(self.components_),
            _t(self.explained_variance_),
        )

    def fit(self, X: Any, y: Any = None) -> PCA:
        t, as_numpy = to_tensor(X)
        n, d = t.shape
        if n < 2:
            raise ValueError(f"PCA needs at least 2 samples, got {n}")
        if self.svd_solver not in SOLVERS:
            raise ValueError(f"svd_solver={self.svd_solver!r} is invalid: expected {' | '.join(SOLVERS)}")
        want = _n_components(self.n_components, n, d, "n_components")
        solver = self.svd_solver
        if solver == "auto":  # scikit-learn's rule (1.5+)
            if d <= 1000 and n >= 10 * d:
                solver = "covariance_eigh"
            elif max(n, d) > 500 and isinstance(want, int) and want < 0.8 * min(n, d):
                solver = "randomized"
            else:
                solver = "full"
        mean = t.mean(dim=0)
        xc = t - mean if solver != "covariance_eigh" else t  # the covariance solver never needs the copy
        if solver == "full":
            S, Vt = _svd_right(xc)
            total = (S**2).sum() / (n - 1)
        elif solver == "covariance_eigh":  # one pass over X: eigenvectors of the (d, d) covariance
            evals, evecs = torch.linalg.eigh(_gram(t) - n * torch.outer(mean, mean))
            evals, Vt = evals.flip(0).clamp(min=0), evecs.flip(1).t()  # descending
            S = (evals).sqrt()
            total = evals.sum() / (n - 1)
        else:
            if not isinstance(want, int):
                raise ValueError("svd_solver='randomized' needs an integer n_components")
            n_iter = self.iterated_power
            if n_iter == "auto":  # scikit-learn's rule: more iterations when few components are asked for
                n_iter = 7 if want < 0.1 * min(n, d) else 4
            if not isinstance(n_iter, numbers.Integral) or isinstance(n_iter, bool) or n_iter < 0:
                raise ValueError(f"iterated_power={self.iterated_power!r} must be 'auto' or an int >= 0")
            _, S, Vt = randomized_svd(xc, want, self.n_oversamples, int(n_iter), self.random_state)
            total = torch.linalg.vector_norm(xc) ** 2 / (n - 1)
        Vt, _ = flip_signs(Vt)
        variance = S**2 / (n - 1)
        ratio = variance / total
        k = (
            want
            if isinstance(want, int)
            else int(torch.searchsorted(ratio.cumsum(0), torch.tensor(want, dtype=ratio.dtype), right=True)) + 1
        )
        k = min(k, len(S))
        rest = min(n, d) - k
        noise = (total - variance[:k].sum()) / rest if rest > 0 else torch.zeros((), dtype=t.dtype)
        self._mean, self._components, self._variance = mean, Vt[:k], variance[:k]
        self._publish(
            as_numpy,
            mean_=mean,
            components_=Vt[:k],
            explained_variance_=variance[:k],
            explained_variance_ratio_=ratio[:k],
            singular_values_=S[:k],
            noise_variance_=noise,
            n_components_=k,
            n_samples_=n,
            n_features_in_=d,
        )
        return self


def _t(a: Any) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))


def _total_variance(t: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Sum of the population variances of the columns of t (n, d), dense or sparse, accumulated in float64.

    Dense: the column means by one matrix-vector product, then the centred sum of squares a block of rows
    at a time (no centred copy of t; column-wise reductions over a tall tensor are slow in torch). Sparse:
    E[x^2] - E[x]^2 from the stored values, so the matrix is never made dense.
    """
    n = t.shape[0]
    if t.is_sparse:
        mean = torch.sparse.sum(t, dim=0).to_dense().double() / n
        squares = torch.sparse.sum(t * t).double() / n
        return (squares - (mean**2).sum()).clamp(min=0)
    mean = _matmul(t.new_ones(1, n), t)[0] / n  # (d,)
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    for block in t.split(chunk):
        total += torch.linalg.vector_norm(block - mean).double() ** 2
    return total / n


class TruncatedSVD(Estimator):
    """Top-k SVD without centering (LSA), for dense or sparse input (scipy.sparse or torch sparse).

    Learned: components_ (k, d), singular_values_, explained_variance_ (of the transformed columns),
    explained_variance_ratio_, n_features_in_.
    """

    components_: Any
    singular_values_: Any
    explained_variance_: Any
    explained_variance_ratio_: Any

    def __init__(
        self,
        n_components: int = 2,
        *,
        algorithm: str = "randomized",
        n_iter: int = 5,
        n_oversamples: int = 10,
        random_state: int | None = None,
    ) -> None:
        self.n_components = n_components
        self.algorithm = algorithm
        self.n_iter = n_iter
        self.n_oversamples = n_oversamples
        self.random_state = random_state

    @staticmethod
    def _input(X: Any) -> tuple[torch.Tensor, bool]:
        if hasattr(X, "tocoo") and not isinstance(X, np.ndarray):  # scipy.sparse
            coo = X.tocoo()
            if not np.isfinite(coo.data).all():
                raise ValueError("X contains NaN or infinite values; clean or impute them first")
            idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
            data = torch.from_numpy(coo.data.astype(np.float64 if coo.data.dtype == np.float64 else np.float32))
            if coo.shape[0] == 0 or coo.shape[1] == 0:
                raise ValueError(f"X is empty: shape {coo.shape}")
            return torch.sparse_coo_tensor(idx, data, coo.shape, check_invariants=True).coalesce(), True
        if isinstance(X, torch.Tensor) and X.is_sparse:
            if X.dim() != 2:
                raise ValueError(f"X must be 2-D, got shape {tuple(X.shape)}")
            return X.coalesce(), False
        return to_tensor(X)

    def _restore_private(self) -> None:
        self._components = _t(self.components_)

    def fit(self, X: Any, y: Any = None) -> TruncatedSVD:
        self.fit_transform(X)
        return self

    def fit_transform(self, X: Any, y: Any = None) -> Any:
        t, as_numpy = self._input(X)
        n, d = t.shape
        k = int(self.n_components)
        if not 1 <= k < d:
            raise ValueError(f"n_components={self.n_components} must be between 1 and n_features - 1 = {d - 1}")
        if self.algorithm == "randomized":
            U, S, Vt = randomized_svd(t, k, self.n_oversamples, self.n_iter, self.random_state)
        elif self.algorithm == "full":
            U, S, Vt = torch.linalg.svd(t.to_dense() if t.is_sparse else t, full_matrices=False)
            U, S, Vt = U[:, :k], S[:k], Vt[:k]
        else:
            raise ValueError(f"algorithm={self.algorithm!r} is invalid: expected randomized | full")
        Vt, flipped = flip_signs(Vt, U)
        assert flipped is not None
        Z = flipped * S  # (n, k): the transformed data
        total = _total_variance(t).to(S.dtype)
        variance = Z.var(dim=0, unbiased=False)
        self._components = Vt
        for name, value in (
            ("components_", Vt),
            ("singular_values_", S),
            ("explained_variance_", variance),
            ("explained_variance_ratio_", variance / total),
        ):
            setattr(self, name, same_kind(value, as_numpy))
        self.n_features_in_ = d
        return same_kind(Z, as_numpy)

    def transform(self, X: Any) -> Any:
        self._check_fitted("components_")
        t, as_numpy = self._input(X)
        if t.shape[1] != self._components.shape[1]:
            raise ValueError(
                f"X has {t.shape[1]} features, but TruncatedSVD was fitted with {self._components.shape[1]}"
            )
        return same_kind(_matmul(t, self._components.t().to(t.device, t.dtype)), as_numpy)

    def inverse_transform(self, Z: Any) -> Any:
        self._check_fitted("components_")
        t, as_numpy = to_tensor(Z, "Z")
        return same_kind(t @ self._components.to(t.device, t.dtype), as_numpy)


def _file_rows(X: np.memmap, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a memory-mapped matrix, read from its file into a fresh array.

    Slicing the memmap itself would keep every page it touched mapped into the process, so a pass over a
    4 GB file would end with 4 GB resident; reading the rows keeps memory at one batch.
    """
    count = (stop - start) * X.shape[1]
    with open(X.filename, "rb") as f:  # type: ignore[arg-type]
        f.seek(X.offset + start * X.strides[0])
        rows = np.fromfile(f, dtype=X.dtype, count=count)
    return rows.reshape(stop - start, X.shape[1])


class IncrementalPCA(_Projection):
    """PCA fitted batch by batch (Ross et al. 2008, as scikit-learn's): memory bounded by the batch size.

    `fit(X)` slices X in batches of `batch_size` rows (default 5 * n_features); a numpy memmap (such as
    `np.load(path, mmap_mode="r")`) is read from its file one batch at a time, so fitting a file larger
    than memory keeps about one batch resident (benchmarks/ipca_memmap.py measures it).
    `partial_fit(batch)` and `fit_batches(iterable)` take batches from anywhere.
    """

    _singular: torch.Tensor

    mean_: Any
    var_: Any
    components_: Any
    singular_values_: Any
    explained_variance_: Any
    n_components_: Any
    n_samples_seen_: Any

    def __init__(self, n_components: int | None = None, *, whiten: bool = False, batch_size: int | None = None) -> None:
        self.n_components = n_components
        self.whiten = whiten
        self.batch_size = batch_size

    def _restore_private(self) -> None:
        self._mean, self._components, self._variance = (
            _t(self.mean_),
            _t(self.components_),
            _t(self.explained_variance_),
        )
        self._singular, self._var = _t(self.singular_values_), _t(self.var_)
        self._seen, self._k = int(self.n_samples_seen_), int(self.n_components_)

    def fit(self, X: Any, y: Any = None) -> IncrementalPCA:
        shape = np.shape(X) if not isinstance(X, torch.Tensor) else tuple(X.shape)
        if len(shape) != 2:
            raise ValueError(f"X must be 2-D (samples, features), got shape {shape}")
        n, d = shape
        size = self.batch_size or 5 * d
        if isinstance(X, np.memmap) and isinstance(X.base, mmap.mmap) and X.flags.c_contiguous:
            return self.fit_batches(_file_rows(X, i, min(i + size, n)) for i in range(0, n, size))
        return self.fit_batches(X[i : i + size] for i in range(0, n, size))

    def fit_batches(self, batches: Iterable[Any]) -> IncrementalPCA:
        for attr in ("components_", "_seen"):
            if hasattr(self, attr):
                delattr(self, attr)
        empty = True
        for batch in batches:
            self.partial_fit(batch)
            empty = False
        if empty:
            raise ValueError("no batches: IncrementalPCA needs data to fit")
        return self

    def partial_fit(self, X: Any, y: Any = None) -> IncrementalPCA:
        t, as_numpy = to_tensor(X)
        n, d = t.shape
        first = not hasattr(self, "_seen")
        if first:
            k = self.n_components if self.n_components is not None else min(n, d)
            if not 1 <= k <= d:
                raise ValueError(f"n_components={self.n_components} must be between 1 and n_features = {d}")
            self._k, self._seen = int(k), 0
            self._mean = torch.zeros(d, dtype=t.dtype, device=t.device)
            self._var = torch.zeros(d, dtype=t.dtype, device=t.device)
        elif d != self._mean.shape[0]:
            raise ValueError(f"batch has {d} features, earlier batches had {self._mean.shape[0]}")
        if n < self._k:
            raise ValueError(f"a batch of {n} rows is smaller than n_components={self._k}; use larger batches")
        seen, total = self._seen, self._seen + n
        batch_mean = t.mean(dim=0)
        new_mean = (seen * self._mean + n * batch_mean) / total
        # Chan et al.'s parallel variance update
        m2 = self._var * seen + ((t - batch_mean) ** 2).sum(0) + (self._mean - batch_mean) ** 2 * seen * n / total
        if first:
            stacked = t - batch_mean
        else:
            correction = np.sqrt(seen * n / total) * (self._mean - batch_mean)
            stacked = torch.cat([self._singular[:, None] * self._components, t - batch_mean, correction[None]])
        S, Vt = _svd_right(stacked)
        Vt, _ = flip_signs(Vt)
        k = self._k
        variance = S**2 / (total - 1)
        var_total = m2.sum() / (total - 1)
        self._mean, self._var, self._seen = new_mean, m2 / total, total
        self._components, self._singular, self._variance = Vt[:k], S[:k], variance[:k]
        rest = min(total, d) - k
        noise = variance[k:].mean() if rest > 0 and len(variance) > k else torch.zeros((), dtype=t.dtype)
        self._publish(
            as_numpy,
            mean_=new_mean,
            var_=m2 / total,
            components_=Vt[:k],
            singular_values_=S[:k],
            explained_variance_=variance[:k],
            explained_variance_ratio_=variance[:k] / var_total,
            noise_variance_=noise,
            n_components_=k,
            n_samples_seen_=total,
            n_features_in_=d,
        )
        return self
