"""Config resolution: presets -> TOML file -> --set overrides, validation messages, TOML round-trip."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from bigmodel.config import (
    PRESETS,
    ConfigError,
    GPTConfig,
    RunConfig,
    TrainConfig,
    load_toml,
    parse_override,
    resolve_config,
    to_toml,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_resolve_to_their_values(name: str) -> None:
    cfg = resolve_config(name)
    assert cfg.preset == name
    for section, values in PRESETS[name].items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"


def test_default_preset_is_small() -> None:
    cfg = resolve_config()
    assert cfg.preset == "small"
    assert cfg.model.n_embd == PRESETS["small"]["model"]["n_embd"]


def test_toml_then_overrides_apply_in_order(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('preset = "tiny"\n[model]\nn_layer = 3\nbias = false\n[train]\nlr = 0.01\nmax_steps = 7\n')
    cfg = resolve_config(None, path, ["train.lr=0.02", "train.max_steps=9", "train.lr=3e-4"])
    assert cfg.preset == "tiny"  # taken from the file
    assert cfg.model.n_layer == 3  # file over preset
    assert cfg.model.bias is False
    assert cfg.model.n_embd == PRESETS["tiny"]["model"]["n_embd"]  # preset where nothing overrides
    assert cfg.train.max_steps == 9  # --set over file
    assert cfg.train.lr == 3e-4  # the last --set wins
    assert isinstance(cfg.train.lr, float)

    # an explicit preset wins over the file's preset, the file's values still apply on top of it
    cfg = resolve_config("small", path, [])
    assert cfg.preset == "small"
    assert cfg.model.n_layer == 3
    assert cfg.model.n_embd == PRESETS["small"]["model"]["n_embd"]


def test_override_values_are_toml_literals() -> None:
    assert parse_override("train.lr=3e-4") == ("train.lr", 3e-4)
    assert parse_override(" train.compile = true ") == ("train.compile", True)
    assert parse_override("train.precision=fp32") == ("train.precision", "fp32")  # bare word: a string
    cfg = resolve_config("tiny", None, ["train.deterministic=true", "train.precision=fp32", "train.warmup_steps=0"])
    assert cfg.train.deterministic is True and cfg.train.precision == "fp32" and cfg.train.warmup_steps == 0
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")


def test_unknown_key_suggests_close_matches() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config("tiny", None, ["train.lrr=0.1"])
    msg = str(info.value)
    assert "train.lrr" in msg
    assert re.search(r"did you mean .*\blr\b", msg), msg

    with pytest.raises(ConfigError, match=r"did you mean .*\bn_embd\b"):
        resolve_config("tiny", None, ["model.n_emb=32"])
    with pytest.raises(ConfigError, match="model.<field> or train.<field>"):
        resolve_config("tiny", None, ["optim.lr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown preset 'tinyy'; did you mean tiny"):
        resolve_config("tinyy")


def test_unknown_keys_in_toml_file_are_errors(tmp_path: Path) -> None:
    bad_key = tmp_path / "bad_key.toml"
    bad_key.write_text("[train]\nmax_step = 5\n")
    with pytest.raises(ConfigError, match=r"train.max_step.*did you mean .*\bmax_steps\b"):
        resolve_config("tiny", bad_key)
    bad_table = tmp_path / "bad_table.toml"
    bad_table.write_text("[optim]\nlr = 5\n")
    with pytest.raises(ConfigError, match=r"unknown table \[optim\]"):
        resolve_config("tiny", bad_table)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config("tiny", tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nlr = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve_config("tiny", broken)


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("model.bias=1", "model.bias"),
        ("train.lr=true", "train.lr"),
        ("train.precision=16", "train.precision"),
    ],
)
def test_wrong_type_names_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field) + r".*wrong type") as info:
        resolve_config("tiny", None, [override])
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.lr=-1", "train.lr"),
        ("train.lr=0", "train.lr"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.beta2=1.0", "train.beta2"),
        ("train.min_lr_ratio=1.5", "train.min_lr_ratio"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints"),
        ("train.precision=fp16", "train.precision"),
        ("model.dropout=1.0", "model.dropout"),
        ("model.n_layer=0", "model.n_layer"),
        ("model.n_embd=65", "model.n_embd"),  # not a multiple of n_head=2
        ("model.vocab_size=1", "model.vocab_size"),
    ],
)
def test_out_of_range_values_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field) + r"=.* is invalid: expected") as info:
        resolve_config("tiny", None, [override])
    assert isinstance(info.value, ValueError)


def test_dataclasses_validate_directly_and_are_keyword_only() -> None:
    with pytest.raises(ValueError, match="train.warmup_steps"):
        TrainConfig(warmup_steps=-1)
    with pytest.raises(TypeError):
        GPTConfig(100)  # type: ignore[call-arg]


def test_grad_accum_steps() -> None:
    cfg = resolve_config("tiny")  # batch_tokens 1024 = micro_batch 8 x block 64 x 2
    assert cfg.grad_accum_steps() == 2
    assert cfg.grad_accum_steps(world_size=2) == 1
    cfg = resolve_config("tiny", None, ["model.block_size=32"])
    assert cfg.grad_accum_steps() == 4

    cfg = resolve_config("tiny", None, ["train.batch_tokens=1000"])
    with pytest.raises(ConfigError, match=r"train.batch_tokens=1000 is not a multiple of .* = 512.*e.g. 1024"):
        cfg.grad_accum_steps()
    with pytest.raises(ConfigError, match="train.batch_tokens=1024"):
        resolve_config("tiny").grad_accum_steps(world_size=4)


def _custom() -> RunConfig:
    return resolve_config(
        "tiny",
        None,
        [
            "model.vocab_size=300",
            "model.bias=false",
            "model.dropout=0.125",
            "train.lr=3e-4",
            "train.deterministic=true",
            "train.precision=fp32",
            "train.max_minutes=0.5",
            "train.min_lr_ratio=0.1",
        ],
    )


@pytest.mark.parametrize("make", [lambda: resolve_config("tiny"), lambda: resolve_config("gpt2"), _custom])
def test_toml_round_trip(tmp_path: Path, make: Callable[[], RunConfig]) -> None:
    cfg = make()
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    back = load_toml(path)
    assert back == cfg
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)
    assert to_toml(back) == to_toml(cfg)
    # and the file is what resolve_config reads as a --config
    assert resolve_config(None, path) == cfg


def test_round_trip_keeps_types(tmp_path: Path) -> None:
    cfg = _custom()
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    back = load_toml(path)
    assert type(back.train.lr) is float and type(back.train.max_steps) is int and type(back.model.bias) is bool
    assert back.model.vocab_size == 300
