"""EarlyStopping: patience, modes, min_delta, NaN, the stop reason, and state that survives a resume."""

from __future__ import annotations

import json

import pytest

from bigmodel.config import ConfigError, resolve_config
from bigmodel.train.selection import EarlyStopping, metric_mode


def test_stops_after_patience_evaluations_without_improvement() -> None:
    es = EarlyStopping(patience=2)
    assert es.mode == "min"  # val_loss
    history = [(100, 3.0, True), (200, 2.5, True), (300, 2.6, False), (400, 2.4, True), (500, 2.45, False)]
    for step, value, improved in history:
        assert es.update(value, step) is improved
        assert not es.should_stop and es.reason == ""
    assert es.update(2.41, 600) is False
    assert es.should_stop
    assert es.best == 2.4 and es.best_step == 400
    assert es.reason == "early stopping: val_loss did not improve for 2 evaluations (patience 2); best 2.4 at step 400"


def test_max_mode_min_delta_and_nan() -> None:
    es = EarlyStopping(patience=3, metric="val_accuracy", min_delta=0.01)
    assert es.mode == "max"
    assert es.update(0.80)
    assert not es.update(0.805)  # better, but not by more than min_delta
    assert es.update(0.82)
    assert not es.update(float("nan"))  # a NaN is never an improvement
    assert not es.update(0.70)
    assert not es.update(0.829)
    assert es.should_stop and "by more than 0.01" in es.reason and "best 0.82" in es.reason
    assert EarlyStopping(patience=1, metric="score", mode="min").mode == "min"  # explicit mode wins


def test_patience_zero_tracks_the_best_but_never_stops() -> None:
    es = EarlyStopping(patience=0)
    for value in [3.0, 4.0, 5.0, 6.0, 7.0]:
        es.update(value)
    assert es.best == 3.0 and not es.should_stop


def test_state_dict_round_trips_through_json() -> None:
    a, b = EarlyStopping(patience=3), EarlyStopping(patience=3)
    for v in [2.0, 1.5, 1.7]:
        a.update(v, step=len(str(v)))
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for v in [1.6, 1.8]:
        assert a.update(v) == b.update(v)
    assert a.state_dict() == b.state_dict() and b.should_stop
    with pytest.raises(ValueError, match="tracks val_loss"):
        EarlyStopping(patience=3, metric="val_accuracy").load_state_dict(a.state_dict())


def test_metric_modes_and_errors() -> None:
    assert [metric_mode(m) for m in ["val_loss", "bits_per_byte", "test_ece", "val_acc", "val_f1"]] == [
        "min",
        "min",
        "min",
        "max",
        "max",
    ]
    with pytest.raises(ValueError, match="set train.early_stopping_mode to min or max"):
        EarlyStopping(patience=2, metric="val_widgets")
    with pytest.raises(ValueError, match="patience=-1"):
        EarlyStopping(patience=-1)


def test_config_knobs() -> None:
    cfg = resolve_config(
        "tiny", None, ["train.early_stopping_patience=4", "train.early_stopping_min_delta=0.001"]
    ).train
    es = EarlyStopping.from_train_config(cfg)
    assert (es.patience, es.metric, es.mode, es.min_delta) == (4, "val_loss", "min", 0.001)
    with pytest.raises(ConfigError, match=r"train\.early_stopping_patience=-2 is invalid"):
        resolve_config("tiny", None, ["train.early_stopping_patience=-2"])
    with pytest.raises(ConfigError, match="needs periodic evaluations: set train.eval_every"):
        resolve_config("tiny", None, ["train.early_stopping_patience=3", "train.eval_every=0"])
    with pytest.raises(
        ConfigError, match=r"train\.early_stopping_mode='lowest' is invalid: expected auto \| min \| max"
    ):
        resolve_config("tiny", None, ["train.early_stopping_mode=lowest"])
