"""Fitted estimators on disk, never pickled: learned arrays in estimator.safetensors, the rest in
estimator.json. Also the `bigmodel features fit|transform` command."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from bigmodel import atomic
from bigmodel.errors import UserError
from bigmodel.features.base import Estimator
from bigmodel.features.decompose import PCA, IncrementalPCA, TruncatedSVD
from bigmodel.features.wavelet import WaveletFeatures

ESTIMATORS: dict[str, type[Estimator]] = {
    "pca": PCA,
    "truncated-svd": TruncatedSVD,
    "incremental-pca": IncrementalPCA,
    "wavelet": WaveletFeatures,
}
FORMAT_VERSION = 1


def save_estimator(est: Estimator, folder: str | Path) -> None:
    """Write a fitted estimator: parameters and scalar attributes as JSON, arrays as safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    learned = {k: v for k, v in vars(est).items() if k.endswith("_") and not k.startswith("_")}
    if not learned:
        raise UserError(f"{type(est).__name__} is not fitted; nothing to save")
    arrays = {
        k: torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v).contiguous()
        for k, v in learned.items()
        if isinstance(v, (np.ndarray, torch.Tensor))
    }
    scalars = {k: (v.item() if hasattr(v, "item") else v) for k, v in learned.items() if k not in arrays}
    name = next(k for k, cls in ESTIMATORS.items() if cls is type(est))
    atomic.write_safetensors(folder / "estimator.safetensors", arrays)
    atomic.write_json(
        folder / "estimator.json",
        {"format_version": FORMAT_VERSION, "estimator": name, "params": est.get_params(), "attributes": scalars},
    )


def load_estimator(folder: str | Path) -> Estimator:
    folder = Path(folder)
    meta_path = folder / "estimator.json"
    if not meta_path.is_file():
        raise UserError(f"{folder} holds no fitted estimator (estimator.json); create one with `bigmodel features fit`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION or meta.get("estimator") not in ESTIMATORS:
        raise UserError(
            f"{meta_path}: unknown estimator format {meta.get('estimator')!r} v{meta.get('format_version')}"
        )
    est = ESTIMATORS[meta["estimator"]](**meta["params"])
    for k, v in load_file(folder / "estimator.safetensors").items():
        setattr(est, k, v.numpy())
    for k, v in meta["attributes"].items():
        setattr(est, k, v)
    est._restore_private()
    return est


def read_matrix(path: str | Path) -> Any:
    """A 2-D array from .npy (memory-mapped) or .csv (one header line allowed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input {path} does not exist")
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r")
    if path.suffix == ".csv":
        try:
            return np.loadtxt(path, delimiter=",", ndmin=2)
        except ValueError:
            try:
                return np.loadtxt(path, delimiter=",", ndmin=2, skiprows=1)
            except ValueError as e:
                raise UserError(f"{path} is not a numeric CSV: {e}") from e
    raise UserError(f"input {path} must be .npy or .csv")


def _components(text: str | None) -> int | float | None:
    if text is None:
        return None
    return float(text) if "." in text else int(text)


def run_features(args: Any) -> int:
    if args.action == "fit":
        X = read_matrix(args.input)
        params: dict[str, Any] = {}
        if args.n_components is not None:
            params["n_components"] = _components(args.n_components)
        if args.kind in ("pca", "incremental-pca"):
            params["whiten"] = args.whiten
        if args.kind == "incremental-pca" and args.batch_size:
            params["batch_size"] = args.batch_size
        if args.kind == "wavelet":
            if args.n_components is not None:
                raise UserError("--n-components does not apply to wavelet features; use --wavelet/--level/--mode")
            params = {"wavelet": args.wavelet, "level": args.level, "mode": args.mode}
        est = ESTIMATORS[args.kind](**params)
        if args.kind != "incremental-pca":
            X = np.asarray(X)
        est.fit(X)
        save_estimator(est, args.out)
        summary = f"fitted {args.kind} on {np.shape(X)[0]:,} x {np.shape(X)[1]} -> {args.out}"
        ratio = getattr(est, "explained_variance_ratio_", None)
        if ratio is not None:
            summary += f" ({len(ratio)} components, {float(np.sum(ratio)):.1%} of the variance)"
        if args.kind == "wavelet":
            summary += f" ({est.level_} levels, {est.n_features_out_} features per signal)"  # type: ignore[attr-defined]
        print(summary, file=sys.stderr)
        return 0
    est = load_estimator(args.model)
    X = np.asarray(read_matrix(args.input))
    Z = est.transform(X)  # type: ignore[attr-defined]
    out = Path(args.out)
    atomic.write_bytes(out, _npy_bytes(np.asarray(Z)))
    print(f"transformed {X.shape[0]:,} rows -> {out} {tuple(np.shape(Z))}", file=sys.stderr)
    return 0


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()
