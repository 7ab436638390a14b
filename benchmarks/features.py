"""Feature extraction: bigmodel.features against scikit-learn and PyWavelets, same data, one process.

Decompositions: a 50,000 x 784 float32 matrix (MNIST-shaped: low-rank structure plus noise, seeded). For
PCA (full, covariance and randomized solvers, 50 components) and TruncatedSVD (randomized, 50
components): seconds for each library (best of --repeats, after one untimed call), the ratio, and the
accuracy difference (max relative difference of the explained variances).

Wavelets: 1,000 signals of 4,096 samples (PyWavelets' ECG recording, shifted, with noise), full-depth
`wavedec` in symmetric mode for a short, a medium and two long filters. PyWavelets runs on the float32
signals and on float64 copies; bigmodel on float32 tensors. The error column is bigmodel's largest
absolute deviation from PyWavelets in float64, relative to the largest |coefficient|. Then `waverec` of
those coefficients, both libraries in float32 (the error: against PyWavelets' float64 round trip).

    python benchmarks/features.py [--rows 50000] [--repeats 3] [--only pca|wavelet] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn import decomposition as skd

from bigmodel.features import PCA, TruncatedSVD, wavedec, waverec


def best(fn, repeats: int) -> tuple[float, object]:
    """Best time of `repeats` calls after one untimed call (both libraries alike: it loads our compiled
    kernels from numba's cache and touches each output's memory once)."""
    times, out = [], fn()
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def decompositions(rows: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((60, 784)).astype(np.float32)
    X = (rng.standard_normal((rows, 60)).astype(np.float32) * np.linspace(10, 1, 60, dtype=np.float32)) @ basis
    X += 0.5 * rng.standard_normal(X.shape).astype(np.float32)
    print(f"X: {X.shape[0]:,} x {X.shape[1]} float32")
    cases = [
        ("PCA full", lambda: skd.PCA(50, svd_solver="full").fit(X), lambda: PCA(50, svd_solver="full").fit(X)),
        (
            "PCA covariance",
            lambda: skd.PCA(50, svd_solver="covariance_eigh").fit(X),
            lambda: PCA(50, svd_solver="covariance_eigh").fit(X),
        ),
        (
            "PCA randomized",
            lambda: skd.PCA(50, svd_solver="randomized", random_state=0).fit(X),
            lambda: PCA(50, svd_solver="randomized", random_state=0).fit(X),
        ),
        (
            "TruncatedSVD",
            lambda: skd.TruncatedSVD(50, random_state=0).fit(X),
            lambda: TruncatedSVD(50, random_state=0).fit(X),
        ),
    ]
    print(
        f"{'':16s} {'sklearn s':>10s} {'bigmodel s':>11s} {'speed-up':>9s} {'max rel. diff of explained variance':>36s}"
    )
    for name, ref_fn, ours_fn in cases:
        t_ref, ref = best(ref_fn, repeats)
        t_ours, ours = best(ours_fn, repeats)
        diff = np.max(np.abs(ours.explained_variance_ - ref.explained_variance_) / ref.explained_variance_)
        print(f"{name:16s} {t_ref:10.2f} {t_ours:11.2f} {t_ref / t_ours:8.2f}x {diff:36.2e}")


def wavelets(repeats: int) -> None:
    import pywt

    rng = np.random.default_rng(0)
    ecg = pywt.data.ecg().astype(np.float64)
    ecg = (ecg - ecg.mean()) / ecg.std()
    starts = rng.integers(0, len(ecg), 1000)
    signals = np.stack([np.roll(np.tile(ecg, 4), -s) for s in starts]) + 0.1 * rng.standard_normal((1000, 4096))
    x64, x32 = signals, signals.astype(np.float32)
    t32 = torch.from_numpy(x32)
    print(f"\nsignals: {x32.shape[0]:,} x {x32.shape[1]:,}, wavedec to full depth, mode symmetric")
    print(
        f"{'':8s} {'pywt f32 ms':>12s} {'pywt f64 ms':>12s} {'bigmodel f32 ms':>16s} "
        f"{'vs pywt f32':>12s} {'vs pywt f64':>12s} {'max rel. error':>15s}"
    )
    for name in ("haar", "db4", "sym8", "coif5"):
        t_p32, _ = best(lambda n=name: pywt.wavedec(x32, n, mode="symmetric"), repeats)
        t_p64, ref = best(lambda n=name: pywt.wavedec(x64, n, mode="symmetric"), repeats)
        t_ours, ours = best(lambda n=name: wavedec(t32, n, "symmetric"), repeats)
        scale = max(np.abs(r).max() for r in ref)
        err = max(np.abs(o.double().numpy() - r).max() for o, r in zip(ours, ref, strict=True)) / scale
        print(
            f"{name:8s} {1e3 * t_p32:12.1f} {1e3 * t_p64:12.1f} {1e3 * t_ours:16.1f} "
            f"{t_p32 / t_ours:11.2f}x {t_p64 / t_ours:11.2f}x {err:15.1e}"
        )
    print("\nwaverec of those coefficients (each library its own float32 ones)")
    print(f"{'':8s} {'pywt f32 ms':>12s} {'bigmodel f32 ms':>16s} {'vs pywt f32':>12s} {'max rel. error':>15s}")
    for name in ("haar", "db4", "sym8", "coif5"):
        ref_c, ours_c = pywt.wavedec(x32, name, mode="symmetric"), wavedec(t32, name, "symmetric")
        t_p32, _ = best(lambda n=name, c=ref_c: pywt.waverec(c, n, mode="symmetric"), repeats)
        t_ours, ours = best(lambda n=name, c=ours_c: waverec(c, n, "symmetric"), repeats)
        ref = pywt.waverec(pywt.wavedec(x64, name, mode="symmetric"), name, mode="symmetric")
        err = np.abs(ours.double().numpy() - ref).max() / np.abs(ref).max()
        print(f"{name:8s} {1e3 * t_p32:12.1f} {1e3 * t_ours:16.1f} {t_p32 / t_ours:11.2f}x {err:15.1e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["pca", "wavelet"], default=None)
    ap.add_argument("--threads", type=int, default=0, help="limit torch and BLAS threads (0: their defaults)")
    args = ap.parse_args()
    if args.threads:  # the same limit for torch and for numpy/scipy's BLAS (scikit-learn, PyWavelets)
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
        torch.set_num_threads(args.threads)
    print(f"threads: {args.threads or 'default'} (torch uses {torch.get_num_threads()})")
    if args.only in (None, "pca"):
        decompositions(args.rows, args.repeats)
    if args.only in (None, "wavelet"):
        wavelets(args.repeats)


if __name__ == "__main__":
    main()
