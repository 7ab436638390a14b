"""Wavelets against PyWavelets: filters, 1-D and 2-D transforms for every family, mode and level, on
PyWavelets' own ECG, El Nino and camera data plus random signals, by both analysis paths (the compiled
numba kernel and the torch path) and against each other; inverses, gradients, layers, errors, and the
WaveletFeatures estimator (scikit-learn contract, Pipeline, CLI)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pywt = pytest.importorskip("pywt")

from bigmodel.features import NotFittedError, wavelet_kernels  # noqa: E402
from bigmodel.features import wavelet as W  # noqa: E402
from bigmodel.features.wavelet import (  # noqa: E402
    WaveletDecomposition,
    WaveletFeatures,
    WaveletReconstruction,
)

ECG = pywt.data.ecg().astype(np.float64)  # (1024,) MIT-BIH heartbeat
NINO = pywt.data.nino()[1]  # (264,) sea surface temperature
IMAGE = pywt.data.camera().astype(np.float64)[100:164, 200:251]  # (64, 51): odd width
RNG = np.random.default_rng(0)


def _t(a: object) -> torch.Tensor:
    return a.detach() if isinstance(a, torch.Tensor) else torch.as_tensor(np.array(a))


def close(ours: object, ref: object, atol: float = 1e-9) -> None:
    torch.testing.assert_close(_t(ours), _t(ref), atol=atol, rtol=0)


def close_list(ours: list, ref: list, atol: float) -> None:
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        if isinstance(b, tuple):
            close_list(list(a), list(b), atol)
        else:
            assert np.shape(a) == np.shape(b)
            close(a, b, atol)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts the calls that reach the compiled kernels: "wavedec" (analysis) and "waverec" (synthesis)."""
    calls: Counter[str] = Counter()
    for name in ("wavedec", "waverec"):
        run = getattr(wavelet_kernels, name)

        def counted(*args: Any, _run: Any = run, _name: str = name) -> Any:
            calls[_name] += 1
            return _run(*args)

        monkeypatch.setattr(wavelet_kernels, name, counted)
    return calls


@pytest.fixture(params=["compiled", "torch"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, kernel_calls: Counter[str]) -> Iterator[str]:
    """Runs a test on each path, then checks that the analyses and syntheses took the path it names."""
    if request.param == "torch":
        monkeypatch.setattr(W, "_USE_KERNEL", False)
    else:
        assert wavelet_kernels.available(), "numba is a dependency: the compiled path must be usable"
    yield request.param
    compiled = request.param == "compiled"
    assert (kernel_calls["wavedec"] > 0, kernel_calls["waverec"] > 0) == (compiled, compiled)


@pytest.mark.parametrize("name", W.WAVELETS)
def test_filter_banks_are_computed_equal_to_pywt(name: str) -> None:
    ours, ref = W.filter_bank(name), pywt.Wavelet(name)
    for attr in ("dec_lo", "dec_hi", "rec_lo", "rec_hi"):
        close(getattr(ours, attr), np.array(getattr(ref, attr)), atol=1e-8)  # pywt's coif5 table: 5e-9
    h = ours.rec_lo
    close(np.correlate(h, h, "full")[len(h) - 1 :: 2], np.eye(1, len(h) // 2)[0], atol=1e-12)  # orthonormal


@pytest.mark.parametrize("mode", W.MODES)
@pytest.mark.parametrize("name", W.WAVELETS)
def test_1d_transforms_equal_pywt_on_ecg_nino_and_short_signals(name: str, mode: str, path: str) -> None:
    signals = [ECG, NINO, RNG.standard_normal((2, 3, 37))]  # batched, odd length
    for x in signals:
        top = pywt.dwt_max_level(x.shape[-1], name)
        assert W.dwt_max_level(x.shape[-1], name) == top
        for level in sorted({1, top} - {0} if top else set()):  # every level offered: 1 .. dwt_max_level
            ours, ref = W.wavedec(x, name, mode, level=level), pywt.wavedec(x, name, mode=mode, level=level)
            close_list(ours, ref, atol=1e-6 * np.abs(x).max())
            rec = W.waverec(ours, name, mode)
            close(rec, pywt.waverec(ref, name, mode=mode), atol=1e-6 * np.abs(x).max())
            close(rec[..., : x.shape[-1]], x, atol=1e-9 * np.abs(x).max())  # perfect reconstruction
    for n in (1, 2, 5, 8):  # shorter than the filter: extension wraps, as in pywt
        x = RNG.standard_normal(n)
        close_list(list(W.dwt(x, name, mode)), list(pywt.dwt(x, name, mode=mode)), atol=1e-7)
        a, d = pywt.dwt(x, name, mode=mode)
        close(W.idwt(a, d, name, mode), pywt.idwt(a, d, name, mode=mode), atol=1e-7)


@pytest.mark.parametrize("mode", W.MODES)
@pytest.mark.parametrize("name", ["haar", "db2", "db5", "sym4", "sym7", "coif1", "coif3"])
def test_2d_transforms_equal_pywt_on_an_image(name: str, mode: str, path: str) -> None:
    top = pywt.dwt_max_level(min(IMAGE.shape), name)
    for level in sorted({1, top}):
        ours = W.wavedec2(IMAGE, name, mode, level=level)
        ref = pywt.wavedec2(IMAGE, name, mode=mode, level=level)
        close_list(ours, ref, atol=1e-7)
        rec = W.waverec2(ours, name, mode)
        close(rec, pywt.waverec2(ref, name, mode=mode), atol=1e-7)
        close(rec[: IMAGE.shape[0], : IMAGE.shape[1]], IMAGE, atol=1e-7)
    cA, details = W.dwt2(IMAGE, name, mode)
    ref_a, ref_d = pywt.dwt2(IMAGE, name, mode=mode)
    close_list([cA, details], [ref_a, ref_d], atol=1e-7)
    close(
        W.idwt2((cA, (None, details[1], None)), name, mode),
        pywt.idwt2((ref_a, (None, ref_d[1], None)), name, mode),
        atol=1e-7,
    )


@pytest.mark.parametrize("mode", W.MODES)
@pytest.mark.parametrize("name", W.WAVELETS)
def test_compiled_path_equals_pywt_and_the_torch_path_in_both_dtypes(
    name: str, mode: str, kernel_calls: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def torch_path(fn: Any, *args: Any, **kwargs: Any) -> Any:
        with monkeypatch.context() as m:
            m.setattr(W, "_USE_KERNEL", False)
            return fn(*args, **kwargs)

    signals = [(RNG.standard_normal(64), -1), (RNG.standard_normal((2, 75, 3)), 1)]  # 1-D even; odd along axis 1
    for x64, axis in signals:
        top = pywt.dwt_max_level(x64.shape[axis], name)
        for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
            x = torch.from_numpy(x64).to(dtype)
            ref_x = x.double().numpy()  # the same samples, transformed by PyWavelets in float64
            ref_tol = max(tol, 1e-7)  # float64: PyWavelets' own coif5 taps are rounded to 5e-9
            for level in sorted({1, top} - {0}):
                before = kernel_calls.copy()
                ours = W.wavedec(x, name, mode, level=level, axis=axis)
                rec = W.waverec(ours, name, mode, axis=axis)
                assert kernel_calls - before == Counter(wavedec=1, waverec=1)
                assert all(c.dtype == dtype for c in [*ours, rec])
                ref = pywt.wavedec(ref_x, name, mode=mode, level=level, axis=axis)
                scale = max(np.abs(r).max() for r in ref)
                close_list([c.double() for c in ours], ref, atol=ref_tol * scale)
                close(rec.double(), pywt.waverec(ref, name, mode=mode, axis=axis), atol=ref_tol * scale)
                close_list(ours, torch_path(W.wavedec, x, name, mode, level=level, axis=axis), atol=tol * scale)
                close(rec, torch_path(W.waverec, ours, name, mode, axis=axis), atol=tol * scale)
                assert kernel_calls - before == Counter(wavedec=1, waverec=1)
            a, d = W.dwt(x, name, mode, axis=axis)
            ref_a, ref_d = pywt.dwt(ref_x, name, mode=mode, axis=axis)
            close_list([a.double(), d.double()], [ref_a, ref_d], atol=ref_tol * np.abs(ref_a).max())
            close(
                W.idwt(a, d, name, mode, axis=axis).double(),
                pywt.idwt(ref_a, ref_d, name, mode, axis=axis),
                atol=ref_tol * np.abs(ref_x).max(),
            )


def test_compiled_path_runs_only_where_no_gradient_is_needed_and_falls_back(
    kernel_calls: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.from_numpy(RNG.standard_normal((4, 50)))
    ref = pywt.wavedec(x.numpy(), "db3", mode="zero", level=2)
    ref_rec = pywt.waverec(ref, "db3", mode="zero")
    coeffs = W.wavedec(x, "db3", "zero", level=2)
    close_list(coeffs, ref, atol=1e-9)
    close(W.waverec(coeffs, "db3", "zero"), ref_rec, atol=1e-9)
    assert kernel_calls == Counter(wavedec=1, waverec=1)
    g = x.clone().requires_grad_()
    g_coeffs = W.wavedec(g, "db3", "zero", level=2)  # a gradient is needed: the torch path
    assert all(c.requires_grad for c in g_coeffs) and W.waverec(g_coeffs, "db3", "zero").requires_grad
    close_list(g_coeffs, ref, atol=1e-9)
    assert kernel_calls == Counter(wavedec=1, waverec=1)
    with torch.no_grad():  # not needed any more: compiled
        close_list(W.wavedec(g, "db3", "zero", level=2), ref, atol=1e-9)
        close(W.waverec(g_coeffs, "db3", "zero"), ref_rec, atol=1e-9)
        WaveletReconstruction("db3", mode="zero")(WaveletDecomposition("db3", level=2, mode="zero")(g))
    assert kernel_calls == Counter(wavedec=3, waverec=3)
    W.wavedec(x.half(), "db3", level=2)  # other dtypes: the torch path
    W.waverec([coeffs[0], None, coeffs[2]], "db3", "zero")  # a missing band: the torch path (zeros)
    with pytest.raises(ValueError, match="coefficient lengths do not match"):  # the torch path's error
        W.waverec([coeffs[0][:, :-2], *coeffs[1:]], "db3", "zero")
    assert kernel_calls == Counter(wavedec=3, waverec=3)

    def broken(*args: object) -> None:
        raise RuntimeError("numba failed")

    monkeypatch.setattr(wavelet_kernels, "_compiled", lambda: (broken, broken))  # failing kernels: torch path
    close_list(W.wavedec(x, "db3", "zero", level=2), ref, atol=1e-9)
    close(W.waverec(coeffs, "db3", "zero"), ref_rec, atol=1e-9)
    assert kernel_calls == Counter(wavedec=4, waverec=4)
    monkeypatch.setattr(wavelet_kernels, "_compiled", lambda: None)  # no numba: not even tried
    close_list(W.wavedec(x, "db3", "zero", level=2), ref, atol=1e-9)
    close(W.waverec(coeffs, "db3", "zero"), ref_rec, atol=1e-9)
    assert kernel_calls == Counter(wavedec=4, waverec=4)


def test_compiled_path_splits_rows_between_threads(kernel_calls: Counter[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wavelet_kernels, "PARALLEL_MIN_SAMPLES", 0)  # split even this small input
    x = RNG.standard_normal((7, 301)).astype(np.float32)  # 7 rows in 3 uneven shares
    ref = pywt.wavedec(x.astype(np.float64), "sym5", mode="symmetric", level=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        coeffs = W.wavedec(x, "sym5", "symmetric", level=3)
        rec = W.waverec(coeffs, "sym5", "symmetric")
    finally:
        torch.set_num_threads(threads)
    assert kernel_calls == Counter(wavedec=1, waverec=1)
    close_list([c.astype(np.float64) for c in coeffs], ref, atol=1e-5)
    close(rec.astype(np.float64), pywt.waverec(ref, "sym5", mode="symmetric"), atol=1e-5)


def test_tensors_keep_kind_dtype_device_and_axis() -> None:
    x = torch.from_numpy(RNG.standard_normal((4, 300, 3))).float()
    coeffs = W.wavedec(x, "sym4", "periodization", level=3, axis=1)
    assert all(isinstance(c, torch.Tensor) and c.dtype == torch.float32 for c in coeffs)
    ref = pywt.wavedec(x.double().numpy(), "sym4", mode="periodization", level=3, axis=1)
    close_list([c.double() for c in coeffs], ref, atol=1e-4)
    torch.testing.assert_close(W.waverec(coeffs, "sym4", "periodization", axis=1), x, atol=1e-5, rtol=0)
    assert isinstance(W.wavedec(ECG, "db2")[0], np.ndarray)
    ints = W.dwt(np.arange(10), "haar")[0]  # integers are transformed as float64
    close(ints, pywt.dwt(np.arange(10.0), "haar")[0])
    img = torch.from_numpy(RNG.standard_normal((2, 3, 20, 24)))
    close_list([W.dwt2(img, "db2", axes=(1, 3))], [pywt.dwt2(img.numpy(), "db2", axes=(1, 3))], atol=1e-9)


def test_missing_bands_count_as_zeros() -> None:
    coeffs = pywt.wavedec(ECG, "db3", level=4)
    for keep in range(len(coeffs)):  # one band alone (the multiresolution view in examples/)
        given = [c if i == keep else None for i, c in enumerate(coeffs)]
        ours = W.waverec(given, "db3")
        if keep <= 1:  # pywt takes None only while the approximation is given; then lengths agree too
            close(ours, pywt.waverec(given, "db3"), atol=1e-8)
        zeros = pywt.waverec([c if i == keep else np.zeros_like(c) for i, c in enumerate(coeffs)], "db3")
        close(ours[: len(zeros)], zeros, atol=1e-8)  # None trims nothing: extra samples only at the end
    cs2 = pywt.wavedec2(IMAGE, "haar", level=2)
    ours = W.waverec2([None, (None, None, None), (cs2[2][0], None, None)], "haar")
    zeros = pywt.waverec2([np.zeros_like(cs2[0]), (None, None, None), (cs2[2][0], None, None)], "haar")
    close(ours, zeros, atol=1e-9)


def test_gradients_flow_through_transforms_and_layers() -> None:
    x = torch.randn(2, 23, dtype=torch.float64, requires_grad=True)
    for mode in W.MODES:
        assert torch.autograd.gradcheck(lambda t, m=mode: tuple(W.wavedec(t, "db2", m, level=2)), (x,))
        coeffs = [c.detach().requires_grad_() for c in W.wavedec(x.detach(), "sym3", mode, level=2)]
        assert torch.autograd.gradcheck(lambda *c, m=mode: W.waverec(list(c), "sym3", m), tuple(coeffs))
    img = torch.randn(11, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: W.dwt2(t, "haar", "symmetric")[1], (img,))

    dec, rec = WaveletDecomposition("coif1", level=3), WaveletReconstruction("coif1")
    signal = torch.from_numpy(ECG[None, :512]).float().requires_grad_()
    out = rec(dec(signal))
    torch.testing.assert_close(out, signal, atol=1e-3, rtol=1e-5)
    out.square().sum().backward()
    assert signal.grad is not None
    torch.testing.assert_close(signal.grad, 2 * signal.detach(), atol=1e-2, rtol=1e-4)  # orthogonal: identity


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: W.wavedec(ECG, "db9"), r"unknown wavelet 'db9'.*haar, db1-db8, sym2-sym8, coif1-coif5"),
        (lambda: W.dwt(ECG, "morlet"), "unknown wavelet"),
        (lambda: W.dwt(ECG, "db2", mode="reflect"), "mode='reflect' is invalid: expected symmetric"),
        (lambda: W.wavedec(ECG, "db4", level=9), r"level=9 is too high.*at most dwt_max_level = 7"),
        (lambda: W.wavedec(ECG, "db4", level=-1), "non-negative"),
        (lambda: W.dwt(np.float64(3.0), "db2"), r"shape \(\.\.\., T\)"),
        (lambda: W.dwt2(ECG, "db2"), r"shape \(\.\.\., H, W\)"),
        (lambda: W.dwt(np.array([1.0, np.nan, 2.0]), "db2"), "NaN or infinite"),
        (lambda: W.dwt(np.empty((3, 0)), "db2"), "empty"),
        (lambda: W.waverec([np.ones(5), np.ones(3)], "db2"), "coefficient lengths do not match"),
        (lambda: W.idwt(np.ones(4), np.ones(5), "db2"), "same shape"),
        (lambda: W.dwt(ECG, "db2", axis=2), "axis=2 is out of range"),
        (lambda: WaveletFeatures(statistics=["energy", "kurtosis"]).fit(ECG[None]), "unknown statistics"),
        (lambda: WaveletFeatures().fit(ECG), "must be 2-D"),
        (lambda: WaveletFeatures(level=12).fit(ECG[None]), "too high"),
    ],
)
def test_bad_input_is_a_clear_value_error(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()  # type: ignore[operator]


def _reference_features(x: np.ndarray, wavelet: str, level: int, stats: list[str]) -> np.ndarray:
    rows = []
    for sig in x:
        bands = pywt.wavedec(sig, wavelet, level=level)
        total = sum(float(np.sum(b**2)) for b in bands)
        row = []
        for b in bands:
            e = float(np.sum(b**2))
            p = b**2 / e
            values = {
                "energy": e,
                "relative_energy": e / total,
                "mean_abs": np.mean(np.abs(b)),
                "std": np.std(b),
                "max_abs": np.max(np.abs(b)),
                "entropy": -np.sum(p[p > 0] * np.log(p[p > 0])),
            }
            row += [values[s] for s in stats]
        rows.append(row)
    return np.array(rows)


def test_wavelet_features_equal_statistics_of_pywt_coefficients() -> None:
    x = np.stack([ECG[i : i + 256] for i in range(0, 768, 96)])  # (8, 256) heartbeat windows
    stats = list(W.STATISTICS)
    est = WaveletFeatures("sym4", level=4, statistics=stats)
    z = est.fit_transform(x)
    assert z.shape == (8, 5 * len(stats)) and est.n_features_out_ == z.shape[1]
    np.testing.assert_allclose(z, _reference_features(x, "sym4", 4, stats), rtol=1e-9, atol=1e-9)
    names = est.get_feature_names_out()
    assert names[0] == "cA4_energy" and names[-1] == "cD1_entropy" and len(names) == z.shape[1]
    logged = WaveletFeatures("sym4", level=4, statistics=["energy"], log_energy=True).fit_transform(x)
    np.testing.assert_allclose(logged, np.log(z[:, 0 :: len(stats)]), rtol=1e-9)
    zt = est.transform(torch.from_numpy(x).float())
    assert isinstance(zt, torch.Tensor) and zt.dtype == torch.float32
    torch.testing.assert_close(zt.double(), torch.from_numpy(z), rtol=1e-4, atol=1e-3)
    layer = est.to_module()
    t = torch.from_numpy(x).requires_grad_()
    layer(t).sum().backward()
    assert t.grad is not None and bool(torch.isfinite(t.grad).all())


def test_wavelet_features_estimator_contract_and_pipeline() -> None:
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    est = WaveletFeatures("db2", level=3)
    assert est.get_params() == {
        "wavelet": "db2",
        "level": 3,
        "mode": "symmetric",
        "statistics": ("energy", "relative_energy", "mean_abs", "std"),
        "log_energy": False,
    }
    assert clone(est).get_params() == est.get_params()
    with pytest.raises(NotFittedError, match="not fitted yet"):
        est.transform(ECG[None])
    assert (
        est.set_params(level=None) is est
        and est.fit(ECG[None, :256]) is est
        and est.level_ == pywt.dwt_max_level(256, "db2")
    )
    with pytest.raises(ValueError, match="samples per signal"):
        est.transform(ECG[None, :200])
    # heartbeats against noise with the same spectrum envelope: wavelet energies separate them
    beats = np.stack([ECG[i : i + 128] for i in range(0, 896, 16)])  # (56, 128)
    noise = RNG.standard_normal(beats.shape) * beats.std(axis=1, keepdims=True) + beats.mean(axis=1, keepdims=True)
    X, y = np.vstack([beats, noise]), np.r_[np.ones(len(beats)), np.zeros(len(noise))]
    pipe = Pipeline([("wav", WaveletFeatures("db4", level=3, log_energy=True)), ("clf", LogisticRegression())])
    assert pipe.fit(X, y).score(X, y) > 0.95


def test_features_cli_fits_and_applies_wavelet_features(tmp_path: Path) -> None:
    from bigmodel.cli import main
    from bigmodel.features.store import load_estimator

    x = np.stack([ECG[i : i + 512] for i in range(0, 512, 64)])
    np.save(tmp_path / "x.npy", x)
    model = tmp_path / "wav"
    args = ["features", "fit", "wavelet", str(tmp_path / "x.npy"), "--wavelet", "coif2", "--level", "3"]
    assert main([*args, "--mode", "periodization", "--out", str(model)]) == 0
    assert sorted(p.name for p in model.iterdir()) == ["estimator.json", "estimator.safetensors"]
    assert main(["features", "transform", str(model), str(tmp_path / "x.npy"), "--out", str(tmp_path / "z.npy")]) == 0
    ref = WaveletFeatures("coif2", level=3, mode="periodization").fit_transform(x)
    np.testing.assert_allclose(np.load(tmp_path / "z.npy"), ref, rtol=1e-10)
    assert load_estimator(model).get_params()["mode"] == "periodization"
    assert main([*args, "--mode", "reflect", "--out", str(tmp_path / "bad")]) == 2
