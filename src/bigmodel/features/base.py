"""The scikit-learn estimator contract, without scikit-learn: parameters, input checks, fitted checks.

`__init__` only stores parameters; `get_params`/`set_params` read them from the signature (so estimators
work in `sklearn.pipeline.Pipeline` and `sklearn.base.clone`); learned attributes end in `_`. Inputs may
be numpy arrays or torch tensors; results come back as the same kind, on the input's device.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch


class NotFittedError(ValueError, AttributeError):
    """An estimator was used before `fit` (same bases as scikit-learn's)."""


class Estimator:
    def fit(self, X: Any, y: Any = None) -> Any:
        raise NotImplementedError

    def _restore_private(self) -> None:
        """Rebuild internal tensors from the public learned attributes (after loading from disk)."""
        raise NotImplementedError

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.name != "self" and p.kind != p.VAR_KEYWORD]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> Estimator:
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"{type(self).__name__} has no parameter {name!r}; valid: {', '.join(valid)}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _check_fitted(self, attribute: str) -> None:
        if not hasattr(self, attribute):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X) before using it")


def to_tensor(X: Any, what: str = "X") -> tuple[torch.Tensor, bool]:
    """A 2-D floating tensor of finite values, and whether the input was numpy (to return the same kind)."""
    is_numpy = not isinstance(X, torch.Tensor)
    if is_numpy:
        try:
            arr = np.asarray(X)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what} must be a 2-D numeric array or tensor: {e}") from e
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"{what} must be numeric, got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # memmaps are read-only: copy the batch
    else:
        t = X.to_dense() if X.is_sparse else X
    if t.dim() != 2:
        raise ValueError(f"{what} must be 2-D (samples, features), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{what} is empty: shape {tuple(t.shape)}; expected at least one sample and feature")
    if not t.is_floating_point():
        t = t.double() if is_numpy and t.dtype == torch.int64 else t.float()
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):  # cheap check first
        raise ValueError(f"{what} contains NaN or infinite values; clean or impute them first")
    return t, is_numpy


def same_kind(t: torch.Tensor, as_numpy: bool) -> Any:
    return t.cpu().numpy() if as_numpy else t
