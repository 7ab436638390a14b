"""Feature arrays for the classify and autoencode tasks: built-in data sets, .npy and .csv files.

`load_arrays(spec)` accepts
  * a built-in name: `digits` (8x8 images of handwritten digits, 1,797 x 64) or `breast-cancer`
    (569 x 30 tumour measurements, 2 classes), both shipped inside scikit-learn (nothing is downloaded);
  * a folder with `train.npy` (+ `train_labels.npy`) or `train.csv`, and optionally `val.*` alike;
  * one `.csv` file (the last column is the label when labels are needed) or one `.npy` file (features only).
Arrays are rows of samples: (N, m), or (N, n_inputs, m) for multi-input models. Labels may be integers or
strings (class names, sorted). Without a validation file, a deterministic stratified 20% is held out: the
same split for every run, so figures compare across models (benchmarks/zoo.py fits its references on it).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bigmodel.errors import UserError

BUILTIN_ARRAYS = ("digits", "breast-cancer")
SPLIT_SEED = 0  # the hold-out split does not depend on the training seed
VAL_FRACTION = 0.2


@dataclass
class ArrayData:
    """Train / validation features (float32) and labels (int64 class ids, or None for unlabelled data)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray | None
    x_val: np.ndarray
    y_val: np.ndarray | None
    labels: list[str] = field(default_factory=list)  # class names; labels[i] is class id i

    @property
    def n_classes(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        """Identity of the training data (shapes + content hash), checked on resume."""
        h = hashlib.sha256(np.ascontiguousarray(self.x_train).tobytes())
        if self.y_train is not None:
            h.update(np.ascontiguousarray(self.y_train).tobytes())
        return f"{self.name}:{self.x_train.shape}:{h.hexdigest()[:16]}"


def holdout_split(n: int, y: np.ndarray | None, fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, val) index arrays; stratified by class when labels are given."""
    rng = np.random.default_rng(SPLIT_SEED)
    groups = [np.arange(n)] if y is None else [np.flatnonzero(y == c) for c in np.unique(y)]
    train, val = [], []
    for idx in groups:
        idx = rng.permutation(idx)
        n_val = int(round(fraction * len(idx)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def load_arrays(spec: str | Path, need_labels: bool = True) -> ArrayData:
    """The data set named or stored at `spec` (see the module docstring), split into train and val."""
    text = str(spec)
    if text in BUILTIN_ARRAYS:
        x, y, names = _builtin(text)
        data = _split(text, x, y, names)  # stratified by class even when the labels are not used
        if not need_labels:
            data.y_train = data.y_val = None
            data.labels = []
        return data
    path = Path(spec)
    if path.is_dir():
        return _from_folder(path, need_labels)
    if path.is_file():
        features, raw_labels = _read(path, need_labels)
        label_ids, class_names = _encode_labels(raw_labels)
        return _split(path.name, features, label_ids, class_names)
    raise UserError(
        f"--data {spec}: no such file or folder; pass {' or '.join(BUILTIN_ARRAYS)}, a .npy/.csv file, "
        "or a folder with train.npy (+ train_labels.npy) or train.csv"
    )


def _builtin(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        from sklearn import datasets
    except ImportError as e:
        raise UserError(f"the built-in data set {name!r} ships with scikit-learn: pip install scikit-learn") from e
    bunch = datasets.load_digits() if name == "digits" else datasets.load_breast_cancer()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64), [str(t) for t in bunch.target_names]


def _split(name: str, x: np.ndarray, y: np.ndarray | None, names: list[str]) -> ArrayData:
    train, val = holdout_split(len(x), y)
    if len(val) == 0 or len(train) == 0:
        raise UserError(f"{name}: {len(x)} samples are too few to hold out a validation split; add a val file")
    return ArrayData(name, x[train], None if y is None else y[train], x[val], None if y is None else y[val], names)


def _from_folder(folder: Path, need_labels: bool) -> ArrayData:
    def find(split: str) -> Path | None:
        for ext in (".npy", ".csv"):
            if (folder / f"{split}{ext}").is_file():
                return folder / f"{split}{ext}"
        return None

    train_path, val_path = find("train"), find("val")
    if train_path is None:
        raise UserError(f"{folder} has no train.npy or train.csv; put the training samples there")
    x_train, y_train = _read(train_path, need_labels)
    if val_path is None:
        y_ids, names = _encode_labels(y_train)
        return _split(folder.name, x_train, y_ids, names)
    x_val, y_val = _read(val_path, need_labels)
    if x_val.shape[1:] != x_train.shape[1:]:
        raise UserError(f"{val_path} has samples of shape {x_val.shape[1:]}, {train_path} {x_train.shape[1:]}")
    if y_train is None or y_val is None:
        return ArrayData(folder.name, x_train, None, x_val, None, [])
    names = _class_names(y_train, y_val)
    return ArrayData(folder.name, x_train, _ids(y_train, names), x_val, _ids(y_val, names), names)


def _read(path: Path, need_labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (float32) and raw labels (or None) from one .npy (+ sibling labels file) or .csv file."""
    if path.suffix == ".npy":
        x = _load_npy(path)
        labels_path = path.with_name(f"{path.stem}_labels.npy")
        if not need_labels:
            return x, None
        if not labels_path.is_file():
            raise UserError(f"{path} has no labels: put them in {labels_path.name} beside it (one per row)")
        y = _load_npy(labels_path, features=False)
        if y.shape != (len(x),):
            raise UserError(f"{labels_path}: expected {len(x)} labels (one per row of {path.name}), got {y.shape}")
        return x, y
    if path.suffix == ".csv":
        return _read_csv(path, need_labels)
    raise UserError(f"{path}: expected a .npy or .csv file")


def _load_npy(path: Path, features: bool = True) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable .npy array (object arrays are refused): {e}") from e
    if not features:
        return arr
    if arr.ndim not in (2, 3) or len(arr) == 0 or not np.issubdtype(arr.dtype, np.number):
        raise UserError(f"{path}: expected a non-empty numeric array (N, m) or (N, n_inputs, m), got {arr.shape}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise UserError(f"{path} holds NaN or infinite values; clean or impute them first")
    return arr


def _read_csv(path: Path, need_labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f) if row]
    if rows and not _numeric(rows[0][: -1 if need_labels else None]):
        rows = rows[1:]  # a header line
    if not rows:
        raise UserError(f"{path} has no data rows")
    width = len(rows[0])
    n_features = width - 1 if need_labels else width
    if n_features < 1:
        raise UserError(f"{path}: each row needs at least one feature column{' and a label column' * need_labels}")
    x = np.empty((len(rows), n_features), dtype=np.float32)
    for i, row in enumerate(rows):
        if len(row) != width:
            raise UserError(f"{path}: row {i + 1} has {len(row)} columns, the first row {width}")
        try:
            x[i] = [float(v) for v in row[:n_features]]
        except ValueError as e:
            raise UserError(f"{path}: row {i + 1} has a non-numeric feature ({e})") from e
    if not np.isfinite(x).all():
        raise UserError(f"{path} holds NaN or infinite values; clean or impute them first")
    y = np.array([row[-1].strip() for row in rows]) if need_labels else None
    return x, y


def _numeric(cells: list[str]) -> bool:
    try:
        [float(c) for c in cells]
    except ValueError:
        return False
    return True


def _sort_key(name: str) -> tuple[int, float | str]:
    """Numeric class names in numeric order (2 before 10), then the others alphabetically."""
    try:
        return (0, float(name))
    except ValueError:
        return (1, name)


def _class_names(*ys: np.ndarray) -> list[str]:
    return sorted({str(v) for y in ys for v in _integral(y)}, key=_sort_key)


def _ids(y: np.ndarray, names: list[str]) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[str(v)] for v in _integral(y)], dtype=np.int64)


def _integral(y: np.ndarray) -> np.ndarray:
    """Float labels that are whole numbers (1.0) name their class like integers (1)."""
    if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
        return y.astype(np.int64)
    return y


def _encode_labels(y: np.ndarray | None) -> tuple[np.ndarray | None, list[str]]:
    if y is None:
        return None, []
    names = _class_names(y)
    return _ids(y, names), names
