"""Checkpoints: the only writer of RUN/checkpoints/step-NNNNNNN/.

A checkpoint is a model directory (config.json, model.safetensors, tokenizer files) plus
`trainer_state/` (optimizer tensors in safetensors, RNG states, data position and counters in JSON) and
the resolved config.toml. It is built in a hidden temporary folder, every file fsynced, the completeness
marker COMPLETE written last, then renamed into place. Only folders with the marker count; nothing is
ever unpickled.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from bigmodel import atomic
from bigmodel.config import RunConfig, diff_configs, load_toml, to_toml
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.errors import UserError
from bigmodel.models.gpt import GPT
from bigmodel.models.hf import load_gpt, save_gpt

FORMAT_VERSION = 1
MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d{7,})$")


def step_dir(folder: Path, step: int) -> Path:
    return folder / f"step-{step:07d}"


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first; warns about folders without the completeness marker."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = STEP_DIR.match(p.name)
        if not m:
            continue
        if (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
        else:
            warnings.warn(f"skipping incomplete checkpoint {p} (no {MARKER} marker)", stacklevel=2)
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path) -> Path | None:
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    folder: Path,
    step: int,
    model: GPT,
    tokenizer: Tokenizer,
    optimizer: torch.optim.Optimizer,
    config: RunConfig,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically and keep the newest `keep` complete ones. Returns its path."""
    final = step_dir(folder, step)
    tmp = folder / f".{final.name}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "trainer_state").mkdir(parents=True)
        save_gpt(model, tmp, tokenizer)
        atomic.write_text(tmp / "config.toml", to_toml(config))
        tensors, meta = _optimizer_tensors(optimizer)
        atomic.write_safetensors(tmp / "trainer_state" / "optimizer.safetensors", tensors)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        atomic.write_safetensors(tmp / "trainer_state" / "rng.safetensors", rng)
        atomic.write_json(
            tmp / "trainer_state" / "state.json",
            {
                "format_version": FORMAT_VERSION,
                **state,
                "optimizer": meta,
                "python_rng": _jsonable(random.getstate()),
            },
        )
        atomic.write_json(tmp / MARKER, {"step": step, "time": time.time()})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        atomic.fsync_dir(folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(folder) if folder.is_dir() else None
        kept = f"; the previous checkpoint {prev.name} is intact" if prev else ""
        raise UserError(f"could not write checkpoint {final}: {e.strerror or e}{kept}") from e
    for old in complete_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(obj: Any) -> Any:
    return [_jsonable(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _tuples(obj: Any) -> Any:
    return tuple(_tuples(o) for o in obj) if isinstance(obj, list) else obj


def load_checkpoint(path: Path, model: GPT, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG states from checkpoint `path`; returns the trainer state."""
    if not (path / MARKER).is_file():
        raise UserError(f"{path} is not a complete checkpoint (no {MARKER} marker); use --resume auto")
    state = json.loads((path / "trainer_state" / "state.json").read_text(encoding="utf-8"))
    if state.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: checkpoint format version {state.get('format_version')} is not "
            f"{FORMAT_VERSION}; it was written by another bigmodel version"
        )
    model.load_state_dict(load_gpt(path).state_dict())
    tensors = load_file(path / "trainer_state" / "optimizer.safetensors")
    optimizer.load_state_dict(_optimizer_state(tensors, state.pop("optimizer")))
    rng = load_file(path / "trainer_state" / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda.{i}"] for i in range(torch.cuda.device_count())])
    random.setstate(_tuples(state.pop("python_rng")))
    return state


def check_compatible(path: Path, config: RunConfig) -> list[str]:
    """Refuse a checkpoint whose model differs from `config`; return the train fields that differ."""
    saved = load_toml(path / "config.toml")
    model_diff = diff_configs(saved.model, config.model, "model")
    if model_diff:
        raise UserError(
            f"checkpoint {path} was trained with another model config ({'; '.join(model_diff)}); "
            "resume with the same --preset/--config/--set, or start a new --out"
        )
    return diff_configs(saved.train, config.train, "train")
