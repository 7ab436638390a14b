"""Two pictures of bigmodel.features on real data that ships with the test dependencies.

- docs/img/ecg_wavelet.png: PyWavelets' 1,024-sample ECG recording split by a 5-level sym4 wavelet
  decomposition into its approximation and detail bands, each band reconstructed on its own so that the
  rows add up to the signal: the slow baseline and T waves sit in A5, the QRS complexes in D3-D4, noise
  in D1. Time axis and band edges assume 360 Hz sampling (the MIT-BIH arrhythmia database's rate).
- docs/img/digits_pca.png: scikit-learn's 8x8 handwritten digits projected on their first two principal
  components, one colour per digit.

    pip install -e '.[dev]'   # PyWavelets and scikit-learn provide the data
    python examples/plot_features.py [--out docs/img]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bigmodel.features import PCA, wavedec, waverec  # noqa: E402

FS = 360.0  # Hz, assumed: the MIT-BIH arrhythmia database rate


def ecg_wavelet(out: Path) -> None:
    import pywt

    ecg = pywt.data.ecg().astype(np.float64)
    level = 5
    coeffs = wavedec(ecg, "sym4", "symmetric", level=level)
    bands = []  # each band alone through the inverse transform: the rows sum to the signal
    for i in range(len(coeffs)):
        only = [c if j == i else None for j, c in enumerate(coeffs)]
        bands.append(waverec(only, "sym4", "symmetric")[: len(ecg)])
    names = [f"A{level}  0-{FS / 2 ** (level + 1):.0f} Hz"] + [
        f"D{j}  {FS / 2 ** (j + 1):.0f}-{FS / 2**j:.0f} Hz" for j in range(level, 0, -1)
    ]
    t = np.arange(len(ecg)) / FS
    fig, axes = plt.subplots(len(bands) + 1, 1, figsize=(9, 8.5), sharex=True)
    axes[0].plot(t, ecg, color="black", lw=0.9)
    axes[0].set_title("ECG (pywt.data.ecg) and its sym4 wavelet decomposition, band by band", fontsize=11)
    axes[0].set_ylabel("signal", rotation=0, ha="right", va="center", fontsize=9)
    colours = plt.cm.viridis(np.linspace(0.1, 0.85, len(bands)))
    for ax, band, name, colour in zip(axes[1:], bands, names, colours, strict=True):
        ax.plot(t, band, color=colour, lw=0.9)
        ax.set_ylabel(name.replace("  ", "\n"), rotation=0, ha="right", va="center", fontsize=9)
    for ax in axes:
        ax.tick_params(labelsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    axes[-1].set_xlabel("time (s)")
    fig.align_ylabels(axes)
    fig.tight_layout()
    fig.savefig(out / "ecg_wavelet.png", dpi=90)
    plt.close(fig)


def digits_pca(out: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pca = PCA(2).fit(digits.data)
    z = pca.transform(digits.data)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10")
    for d in range(10):
        pts = z[digits.target == d]
        ax.scatter(pts[:, 0], pts[:, 1], s=7, color=cmap(d), alpha=0.55, label=str(d))
        cx, cy = np.median(pts, axis=0)
        ax.text(
            cx,
            cy,
            str(d),
            fontsize=16,
            weight="bold",
            ha="center",
            va="center",
            color=cmap(d),
            bbox={"boxstyle": "circle,pad=0.2", "fc": "white", "ec": cmap(d), "alpha": 0.85},
        )
    r = pca.explained_variance_ratio_
    ax.set_xlabel(f"principal component 1 ({r[0]:.1%} of the variance)")
    ax.set_ylabel(f"principal component 2 ({r[1]:.1%})")
    ax.set_title("1,797 handwritten digits (8x8 pixels) projected on two principal components", fontsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(out / "digits_pca.png", dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "img"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ecg_wavelet(out)
    digits_pca(out)
    for name in ("ecg_wavelet.png", "digits_pca.png"):
        print(f"wrote {out / name} ({(out / name).stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
