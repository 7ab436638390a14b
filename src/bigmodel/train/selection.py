"""Model selection during training: early stopping on a validation metric, and which evaluation was best.

The loop calls `EarlyStopping.update(value, step)` after every validation evaluation: it returns True
when the value is a new best (save the model as RUN/best/), and `should_stop` turns True once
`patience` evaluations in a row have not improved on the best by more than `min_delta`; `reason` then
says why, for the run's log and result. `state_dict()` is plain JSON, so it rides along in a checkpoint's
trainer state and a resumed run stops at the same evaluation an uninterrupted one would.
"""

from __future__ import annotations

import math
import re
from typing import Any

from bigmodel.config import EARLY_STOPPING_MODES, TrainConfig

# Words in a metric's name that say which way it should go, for mode="auto".
_LOWER_IS_BETTER = {"loss", "nll", "error", "err", "perplexity", "ppl", "bits", "bpb", "ece", "mse", "mae", "rmse"}
_HIGHER_IS_BETTER = {"accuracy", "acc", "f1", "auc", "precision", "recall", "r2", "score"}


def metric_mode(metric: str) -> str:
    """ "min" or "max" from the words of a metric name (val_loss -> min, val_accuracy -> max); else ValueError."""
    words = set(re.split(r"[^a-z0-9]+", metric.lower()))
    lower, higher = bool(words & _LOWER_IS_BETTER), bool(words & _HIGHER_IS_BETTER)
    if lower != higher:
        return "min" if lower else "max"
    raise ValueError(
        f"cannot tell whether a higher or lower {metric!r} is better; set train.early_stopping_mode to min or max"
    )


class EarlyStopping:
    """Tracks the best value of one validation metric and stops after `patience` evaluations without a
    real improvement (better than the best by more than `min_delta`). patience=0 never stops, but still
    tracks the best (for RUN/best/)."""

    def __init__(self, patience: int, metric: str = "val_loss", mode: str = "auto", min_delta: float = 0.0) -> None:
        if patience < 0:
            raise ValueError(f"patience={patience} must be >= 0 (0 = never stop)")
        if min_delta < 0 or not math.isfinite(min_delta):
            raise ValueError(f"min_delta={min_delta} must be a finite float >= 0")
        if mode not in EARLY_STOPPING_MODES:
            raise ValueError(f"mode={mode!r} must be one of {', '.join(EARLY_STOPPING_MODES)}")
        self.patience, self.metric, self.min_delta = patience, metric, min_delta
        self.mode = metric_mode(metric) if mode == "auto" else mode
        self.best: float | None = None
        self.best_step: int | None = None
        self.evaluations = 0  # values seen
        self.bad_evaluations = 0  # consecutive values without improvement
        self.last_step: int | None = None

    @classmethod
    def from_train_config(cls, cfg: TrainConfig) -> EarlyStopping:
        return cls(
            cfg.early_stopping_patience,
            cfg.early_stopping_metric,
            cfg.early_stopping_mode,
            cfg.early_stopping_min_delta,
        )

    def is_improvement(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float, step: int | None = None) -> bool:
        """Record one evaluation's value; True when it is the new best (a NaN never is)."""
        value = float(value)
        self.evaluations += 1
        self.last_step = step
        if self.is_improvement(value):
            self.best, self.best_step, self.bad_evaluations = value, step, 0
            return True
        self.bad_evaluations += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evaluations >= self.patience

    @property
    def reason(self) -> str:
        """Why the run stopped (or would stop), in one line for the log and the run's result."""
        if not self.should_stop:
            return ""
        at = f" at step {self.best_step}" if self.best_step is not None else ""
        delta = f" by more than {self.min_delta:g}" if self.min_delta else ""
        return (
            f"early stopping: {self.metric} did not improve{delta} for {self.bad_evaluations} evaluations "
            f"(patience {self.patience}); best {self.best:.6g}{at}"
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state (NaN-free: a best of None means no finite value yet)."""
        return {
            "metric": self.metric,
            "mode": self.mode,
            "best": self.best,
            "best_step": self.best_step,
            "evaluations": self.evaluations,
            "bad_evaluations": self.bad_evaluations,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("metric") != self.metric or state.get("mode") != self.mode:
            raise ValueError(
                f"the saved early-stopping state tracks {state.get('metric')} ({state.get('mode')}), this run "
                f"tracks {self.metric} ({self.mode}); resume with the same train.early_stopping_metric"
            )
        self.best, self.best_step = state["best"], state["best_step"]
        self.evaluations, self.bad_evaluations = state["evaluations"], state["bad_evaluations"]
        self.last_step = state.get("last_step")
