"""Decompositions: bigmodel.features against scikit-learn, same data, one process.

A 50,000 x 784 float32 matrix (MNIST-shaped: low-rank structure plus noise, seeded). For PCA (full and
randomized, 50 components) and TruncatedSVD (randomized, 50 components): seconds for each library
(best of --repeats), the ratio, and the accuracy difference (max relative difference of the explained
variances).

    python benchmarks/features.py [--rows 50000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn import decomposition as skd

from bigmodel.features import PCA, TruncatedSVD


def best(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((60, 784)).astype(np.float32)
    X = (rng.standard_normal((args.rows, 60)).astype(np.float32) * np.linspace(10, 1, 60, dtype=np.float32)) @ basis
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
        t_ref, ref = best(ref_fn, args.repeats)
        t_ours, ours = best(ours_fn, args.repeats)
        diff = np.max(np.abs(ours.explained_variance_ - ref.explained_variance_) / ref.explained_variance_)
        print(f"{name:16s} {t_ref:10.2f} {t_ours:11.2f} {t_ref / t_ours:8.2f}x {diff:36.2e}")


if __name__ == "__main__":
    main()
