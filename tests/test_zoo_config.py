"""Model families in the config: `model.arch`, task <-> arch resolution, per-family validation, TOML round trip."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from bigmodel.config import (
    MODEL_CONFIGS,
    PRESETS,
    TASK_ARCHS,
    ConfigError,
    EncoderConfig,
    GPTConfig,
    MLPConfig,
    RNNSeq2SeqConfig,
    diff_configs,
    load_toml,
    resolve_config,
    to_toml,
)


def test_task_and_arch_imply_each_other() -> None:
    assert (resolve_config().task, type(resolve_config().model)) == ("lm", GPTConfig)
    cfg = resolve_config(task="classify")  # the task's default arch, and that arch's preset
    assert isinstance(cfg.model, MLPConfig) and cfg.preset == "mlp"
    cfg = resolve_config("seq2seq")  # a preset implies its arch, the arch its task
    assert cfg.task == "seq2seq"
    cfg = resolve_config(None, None, ["model.arch=rnn-seq2seq", "model.cell=lstm"])
    assert cfg.task == "seq2seq" and isinstance(cfg.model, RNNSeq2SeqConfig) and cfg.model.cell == "lstm"
    cfg = resolve_config(None, None, ["model.arch=encoder", "model.n_layer=3"], task="classify")
    assert cfg.task == "classify" and isinstance(cfg.model, EncoderConfig) and cfg.model.n_layer == 3
    for task, archs in TASK_ARCHS.items():
        assert all(a in MODEL_CONFIGS for a in archs), task


def test_arch_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match=r"model.arch='encoder' cannot be trained on task 'seq2seq'"):
        resolve_config(None, None, ["model.arch=encoder"], task="seq2seq")
    with pytest.raises(ConfigError, match=r"model.arch='mlpp' is invalid: expected one of gpt, mlp"):
        resolve_config(None, None, ["model.arch=mlpp"])
    with pytest.raises(ConfigError, match=r"unknown task 'clasify'; did you mean classify"):
        resolve_config(task="clasify")
    with pytest.raises(ConfigError, match=r"preset 'seq2seq' is for model.arch='seq2seq', not 'rnn-seq2seq'"):
        resolve_config("seq2seq", None, ["model.arch=rnn-seq2seq"])
    # a key of another family: unknown, with the arch named and close keys listed
    with pytest.raises(ConfigError, match=r"unknown config key 'model.n_layer' \(model.arch='mlp'\); did you mean"):
        resolve_config("mlp", None, ["model.n_layer=2"])
    with pytest.raises(ConfigError, match=r"unknown config key .model.n_hidden.; did you mean n_head"):
        resolve_config("tiny", None, ["model.n_hidden=2"])  # GPT has no n_hidden


@pytest.mark.parametrize(
    "preset, override, field",
    [
        ("mlp", "model.connection=diagonal", "model.connection"),
        ("mlp", "model.density=0", "model.density"),
        ("mlp", "model.hidden=30", "model.hidden"),  # interactive needs a multiple of groups: set below
        ("multi-input", "model.merge=max", "model.merge"),
        ("seq2seq", "model.n_embd=102", "model.n_embd"),  # not a multiple of n_head=4
        ("rnn-seq2seq", "model.hidden=31", "model.hidden"),
        ("encoder", "model.mask_prob=1.0", "model.mask_prob"),
        ("autoencoder", "model.sparsity=l2", "model.sparsity"),
        ("autoencoder", "model.kl_target=0", "model.kl_target"),
    ],
)
def test_family_values_are_validated(preset: str, override: str, field: str) -> None:
    overrides = [override] + (["model.connection=interactive"] if field == "model.hidden" and preset == "mlp" else [])
    with pytest.raises(ConfigError, match=re.escape(field) + r"=.* is invalid: expected"):
        resolve_config(preset, None, overrides)


def test_batch_size_accounting() -> None:
    cfg = resolve_config("mlp", None, ["train.batch_size=64", "train.micro_batch=16"])
    assert cfg.example_accum_steps() == 4 and cfg.grad_accum_steps() == 4 and cfg.example_accum_steps(2) == 2
    with pytest.raises(ConfigError, match=r"train.batch_size=64 is not a multiple of .* = 48"):
        resolve_config("mlp", None, ["train.micro_batch=48"]).example_accum_steps()


@pytest.mark.parametrize("preset", [p for p in PRESETS if PRESETS[p]["model"].get("arch", "gpt") != "gpt"])
def test_zoo_presets_round_trip_through_toml(preset: str, tmp_path: Path) -> None:
    cfg = resolve_config(preset)
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert f'arch = "{preset}"' in path.read_text()
    back = load_toml(path)
    assert back == cfg and type(back.model) is type(cfg.model)
    assert resolve_config(None, path) == cfg  # the file is also a --config


def test_diff_configs_across_families() -> None:
    a, b = resolve_config("mlp").model, resolve_config("autoencoder").model
    assert diff_configs(a, b, "model") == ["model.arch: 'mlp' -> 'autoencoder'"]
    c = dataclasses.replace(resolve_config("mlp").model, hidden=8)  # type: ignore[type-var]
    assert diff_configs(a, c, "model") == ["model.hidden: 64 -> 8"]
