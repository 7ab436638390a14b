"""PCA, TruncatedSVD, IncrementalPCA against scikit-learn on real data (digits), plus the estimator contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

sklearn = pytest.importorskip("sklearn")
from sklearn import decomposition as skd  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402

from bigmodel.features import PCA, IncrementalPCA, NotFittedError, TruncatedSVD  # noqa: E402

X = load_digits().data.astype(np.float64)  # (1797, 64)


def _same_up_to_sign(a: np.ndarray, b: np.ndarray, atol: float = 1e-6) -> None:
    signs = np.sign((a * b).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(a * signs, b, atol=atol, rtol=0)


@pytest.mark.parametrize("n_components", [10, 0.9, None])
def test_pca_full_matches_sklearn(n_components: int | float | None) -> None:
    ours = PCA(n_components, svd_solver="full").fit(X)
    ref = skd.PCA(n_components, svd_solver="full").fit(X)
    assert ours.n_components_ == ref.n_components_
    np.testing.assert_allclose(ours.explained_variance_, ref.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(ours.explained_variance_ratio_, ref.explained_variance_ratio_, rtol=1e-4)
    np.testing.assert_allclose(ours.singular_values_, ref.singular_values_, rtol=1e-4)
    k = min(ours.n_components_, 40)  # digits has constant pixels: the last directions span a null space
    _same_up_to_sign(ours.components_[:k], ref.components_[:k])
    np.testing.assert_allclose(ours.noise_variance_, ref.noise_variance_, rtol=1e-4, atol=1e-10)
    np.testing.assert_allclose(np.abs(ours.transform(X))[:, :k], np.abs(ref.transform(X))[:, :k], atol=1e-6)


def test_pca_randomized_and_whitening_match_sklearn() -> None:
    ours = PCA(8, svd_solver="randomized", whiten=True, iterated_power=7, random_state=0).fit(X)
    ref = skd.PCA(8, svd_solver="full", whiten=True).fit(X)
    np.testing.assert_allclose(ours.explained_variance_, ref.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(ours.explained_variance_ratio_, ref.explained_variance_ratio_, rtol=1e-4)
    _same_up_to_sign(ours.components_, ref.components_, atol=1e-4)
    z = ours.transform(X)
    np.testing.assert_allclose(z.std(axis=0, ddof=1), np.ones(8), rtol=1e-4)  # whitened: unit variance
    np.testing.assert_allclose(ours.inverse_transform(z), ref.inverse_transform(ref.transform(X)), atol=1e-3)


def test_inverse_transform_reconstructs_with_all_components() -> None:
    pca = PCA().fit(X)
    np.testing.assert_allclose(pca.inverse_transform(pca.transform(X)), X, atol=1e-8)


def test_truncated_svd_matches_sklearn_dense_and_sparse() -> None:
    scipy_sparse = pytest.importorskip("scipy.sparse")
    ref = skd.TruncatedSVD(5, algorithm="arpack").fit(X)
    for data in (X, scipy_sparse.csr_matrix(X)):
        ours = TruncatedSVD(5, random_state=0, n_iter=7)
        z = ours.fit_transform(data)
        np.testing.assert_allclose(ours.singular_values_, ref.singular_values_, rtol=1e-4)
        np.testing.assert_allclose(ours.explained_variance_ratio_, ref.explained_variance_ratio_, rtol=1e-3)
        _same_up_to_sign(ours.components_, ref.components_, atol=1e-4)
        np.testing.assert_allclose(np.abs(z), np.abs(ref.transform(X)), atol=1e-3)


def test_incremental_pca_matches_sklearn_and_streams_a_memmap(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, X)
    mm = np.load(path, mmap_mode="r")
    ours = IncrementalPCA(10, batch_size=200).fit(mm)
    ref = skd.IncrementalPCA(10, batch_size=200).fit(X)
    np.testing.assert_allclose(ours.explained_variance_, ref.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(ours.explained_variance_ratio_, ref.explained_variance_ratio_, rtol=1e-4)
    np.testing.assert_allclose(ours.mean_, ref.mean_, rtol=1e-10)
    np.testing.assert_allclose(ours.var_, ref.var_, rtol=1e-8)
    _same_up_to_sign(ours.components_, ref.components_, atol=1e-6)
    assert ours.n_samples_seen_ == len(X)
    # and against exact PCA: the leading variances agree closely
    full = PCA(10, svd_solver="full").fit(X)
    np.testing.assert_allclose(ours.explained_variance_[:3], full.explained_variance_[:3], rtol=1e-2)
    with pytest.raises(ValueError, match="smaller than n_components"):
        IncrementalPCA(10).partial_fit(X[:5])


def test_torch_in_torch_out_and_nn_module() -> None:
    t = torch.from_numpy(X).float()
    pca = PCA(4).fit(t)
    assert isinstance(pca.components_, torch.Tensor) and pca.components_.dtype == torch.float32
    z = pca.transform(t)
    assert isinstance(z, torch.Tensor) and z.shape == (len(X), 4)
    layer = pca.to_module()
    assert list(layer.parameters()) == []  # frozen: buffers only
    torch.testing.assert_close(layer(t), z)
    assert isinstance(PCA(4).fit(X).transform(X), np.ndarray)


def test_estimator_contract_and_pipeline() -> None:
    pca = PCA(5, whiten=True)
    assert pca.get_params() == {
        "n_components": 5,
        "whiten": True,
        "svd_solver": "auto",
        "n_oversamples": 10,
        "iterated_power": "auto",
        "random_state": None,
    }
    assert pca.set_params(n_components=3) is pca and pca.n_components == 3
    with pytest.raises(ValueError, match="no parameter 'bogus'"):
        pca.set_params(bogus=1)
    assert pca.fit(X) is pca
    assert clone(pca).get_params() == pca.get_params()
    y = load_digits().target
    pipe = Pipeline([("pca", PCA(20)), ("clf", LogisticRegression(max_iter=2000))]).fit(X, y)
    assert pipe.score(X, y) > 0.9
    for est in (PCA(), TruncatedSVD(), IncrementalPCA()):
        with pytest.raises(NotFittedError, match="not fitted yet"):
            est.transform(X)


@pytest.mark.parametrize(
    "data, kwargs, match",
    [
        (X[0], {}, "must be 2-D"),
        (np.empty((0, 3)), {}, "empty"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), {}, "NaN or infinite"),
        (X, {"n_components": 65}, "between 1 and"),
        (X, {"n_components": 1.5}, "variance fraction"),
        (X, {"svd_solver": "magic"}, "svd_solver"),
        (np.array([["a", "b"]]), {}, "numeric"),
    ],
)
def test_bad_input_is_a_clear_value_error(data: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PCA(**kwargs).fit(data)
    fitted = PCA(3).fit(X)
    with pytest.raises(ValueError, match="features"):
        fitted.transform(X[:, :10])


@pytest.mark.parametrize("kind", ["pca", "truncated-svd", "incremental-pca"])
def test_features_cli_fit_transform_round_trip(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bigmodel.cli import main
    from bigmodel.features.store import load_estimator

    data = tmp_path / "x.npy"
    np.save(data, X)
    model = tmp_path / "est"
    assert main(["features", "fit", kind, str(data), "--n-components", "6", "--out", str(model)]) == 0
    assert sorted(p.name for p in model.iterdir()) == ["estimator.json", "estimator.safetensors"]
    assert main(["features", "transform", str(model), str(data), "--out", str(tmp_path / "z.npy")]) == 0
    z = np.load(tmp_path / "z.npy")
    assert z.shape == (len(X), 6)
    est = load_estimator(model)
    np.testing.assert_allclose(est.transform(X), z, rtol=1e-10, atol=1e-10)
    ref = {"pca": PCA(6), "truncated-svd": TruncatedSVD(6, random_state=0), "incremental-pca": IncrementalPCA(6)}[kind]
    np.testing.assert_allclose(np.abs(z[:, :3]), np.abs(ref.fit(X).transform(X)[:, :3]), atol=1e-4)
    csv = tmp_path / "x.csv"
    np.savetxt(csv, X[:50], delimiter=",", header="a,b", comments="")
    assert main(["features", "transform", str(model), str(csv), "--out", str(tmp_path / "z2.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "z2.npy"), z[:50], rtol=1e-8, atol=1e-8)
    capsys.readouterr()
    assert main(["features", "transform", str(tmp_path), str(data), "--out", str(tmp_path / "z3.npy")]) == 2
    assert "no fitted estimator" in capsys.readouterr().err


def test_pca_covariance_solver_and_auto_match_sklearn() -> None:
    ref = skd.PCA(12, svd_solver="full").fit(X)
    for solver in ("covariance_eigh", "auto"):  # digits: n >= 10 d, so auto picks the covariance solver
        ours = PCA(12, svd_solver=solver).fit(X)
        np.testing.assert_allclose(ours.explained_variance_, ref.explained_variance_, rtol=1e-6)
        np.testing.assert_allclose(ours.explained_variance_ratio_, ref.explained_variance_ratio_, rtol=1e-6)
        np.testing.assert_allclose(ours.singular_values_, ref.singular_values_, rtol=1e-6)
        _same_up_to_sign(ours.components_, ref.components_, atol=1e-6)
        np.testing.assert_allclose(ours.noise_variance_, ref.noise_variance_, rtol=1e-6)


def test_randomized_solvers_on_ill_conditioned_float32_data() -> None:
    """Singular values spanning 1e6: the power iterations' Cholesky-QR would fail on such a basis, falls back
    to Householder QR, and the leading spectrum still matches the exact SVD; 'auto' power iterations as in
    scikit-learn."""
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((2000, 40)))
    v, _ = np.linalg.qr(rng.standard_normal((100, 40)))
    s = np.logspace(3, -3, 40)
    A = ((u * s) @ v.T).astype(np.float32)
    exact = np.linalg.svd(A.astype(np.float64), compute_uv=False)[:5]
    ours = TruncatedSVD(5, random_state=0).fit(A)
    np.testing.assert_allclose(ours.singular_values_, exact, rtol=1e-4)
    pca = PCA(5, svd_solver="randomized", random_state=0).fit(A)
    ref = skd.PCA(5, svd_solver="full").fit(A.astype(np.float64))
    np.testing.assert_allclose(pca.explained_variance_, ref.explained_variance_, rtol=1e-4)
    with pytest.raises(ValueError, match="iterated_power"):
        PCA(5, svd_solver="randomized", iterated_power="many").fit(A)
    with pytest.raises(ValueError, match="iterated_power"):
        PCA(5, svd_solver="randomized", iterated_power=True).fit(A)
    power = PCA(5, svd_solver="randomized", iterated_power=np.int64(7), random_state=0).fit(A)  # from a grid search
    np.testing.assert_allclose(power.explained_variance_, pca.explained_variance_, rtol=1e-6)


def test_truncated_svd_variance_of_sparse_input_is_not_densified() -> None:
    scipy_sparse = pytest.importorskip("scipy.sparse")
    S = scipy_sparse.random(500, 300, density=0.02, random_state=0, format="csr", dtype=np.float64) * 5
    ours = TruncatedSVD(4, random_state=0).fit(S)
    total = S.toarray().var(axis=0).sum()  # what the ratios divide by
    np.testing.assert_allclose(ours.explained_variance_ / ours.explained_variance_ratio_, total, rtol=1e-10)
    dense = TruncatedSVD(4, random_state=0).fit(S.toarray().astype(np.float32) + 1000)  # a large mean
    np.testing.assert_allclose(dense.explained_variance_ / dense.explained_variance_ratio_, total, rtol=1e-4)


def test_randomized_svd_gram_path_and_its_fallback_match_the_exact_svd() -> None:
    """Tall dense input runs the power iterations on M.T @ M; when the Gram matrix cannot resolve the k-th
    direction in float32 (a large mean, uncentred), the sampled iterations run instead. Both are exact to
    float32 precision here, and so is a wide matrix (never the Gram path)."""
    from bigmodel.features import decompose

    rng = np.random.default_rng(1)
    low = (rng.standard_normal((3000, 20)) * np.linspace(5, 1, 20)) @ rng.standard_normal((20, 120))
    for A, gram in ((low, True), (low + 1000.0, False), (low[:100].copy(), False)):
        A32 = torch.from_numpy(A.astype(np.float32))
        tall = A.shape[0] >= A.shape[1]
        assert decompose._gram_pays(A32, 15, 5) == tall
        if tall:
            found = decompose._gram_range(A32, 5, torch.randn(A.shape[1], 15), 5)
            assert isinstance(found, tuple) == gram  # else: the subspace, to start the sampled iterations
            assert gram or found.shape == (A.shape[1], 15)
        U, S, Vt = decompose.randomized_svd(A32, 5, n_iter=5, seed=0)
        exact = np.linalg.svd(A, compute_uv=False)[:5]
        np.testing.assert_allclose(S.numpy(), exact, rtol=1e-4)
        np.testing.assert_allclose((U * S) @ Vt, A32 @ Vt.T @ Vt, atol=1e-2 * exact[0] / 1e3)
