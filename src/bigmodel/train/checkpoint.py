"""Checkpoints: the only writer of RUN/checkpoints/step-NNNNNNN/.

    step-0000500/
      config.json, model.safetensors, tokenizer.json, ...   a model directory (rank 0, consolidated weights)
      config.toml                                           the resolved run config
      trainer_state/dcp/                                    model + optimizer through torch.distributed.checkpoint:
                                                            every rank writes its own shard; loadable at any world size
      trainer_state/rank-00000.safetensors                  each rank's RNG states
      trainer_state/state.json                              step, tokens, data position, guards, format version
      COMPLETE                                              written last, after everything else is fsynced

The folder is built as a hidden `.step-N.tmp`, every rank's files fsynced, the ranks agree that all writes
succeeded, then rank 0 writes the marker and renames the folder into place. Only folders with the marker
count, so a crash (or SIGKILL) at any moment leaves either the previous checkpoints or a complete new one.
Nothing is unpickled: tensors are read by safetensors, and DCP's metadata and byte items through a
restricted unpickler that accepts only DCP's own metadata classes and plain containers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from bigmodel import atomic
from bigmodel.config import RunConfig, diff_configs, load_toml, to_toml
from bigmodel.errors import UserError
from bigmodel.train.distributed import Distributed

FORMAT_VERSION = 2
MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d{7,})$")
# Testing hook: SIGKILL rank 0 inside the save of checkpoint N, after the shards are written but before
# the marker (proves that a half-written checkpoint is never resumed from).
KILL_IN_CHECKPOINT_ENV = "BIGMODEL_KILL_IN_CHECKPOINT"


def step_dir(folder: Path, step: int) -> Path:
    return folder / f"step-{step:07d}"


def complete_checkpoints(folder: Path, warn: bool = True) -> list[Path]:
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
        elif warn:
            warnings.warn(f"skipping incomplete checkpoint {p} (no {MARKER} marker)", stacklevel=2)
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path, warn: bool = True) -> Path | None:
    found = complete_checkpoints(folder, warn)
    return found[-1] if found else None


# ----- save -----------------------------------------------------------------------------------------------
def save_checkpoint(
    folder: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    save_model: Callable[[Path], None] | None,
    config: RunConfig,
    state: dict[str, Any],
    keep: int,
    ctx: Distributed | None = None,
) -> Path:
    """Write checkpoint `step` on every rank (a collective call) and keep the newest `keep` complete ones.

    `model` is the unwrapped (possibly FSDP-sharded) module; `save_model(dir)` writes the consolidated
    model directory and is given on rank 0 only. Returns the checkpoint's path.
    """
    ctx = ctx or Distributed()
    final = step_dir(folder, step)
    tmp = folder / f".{final.name}.tmp"
    error: BaseException | None = None
    try:
        if ctx.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "trainer_state").mkdir(parents=True)
    except OSError as e:
        error = e
    if not ctx.any(error is not None):  # every rank waits until the folder exists
        try:
            msd, osd = get_state_dict(model, optimizer)
            solo = not ctx.active
            with _quiet_single_process():
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp / "trainer_state" / "dcp", no_dist=solo)
            atomic.write_safetensors(tmp / "trainer_state" / f"rank-{ctx.rank:05d}.safetensors", _rng_state())
            if save_model is not None:
                save_model(tmp)
            if ctx.is_main:
                atomic.write_text(tmp / "config.toml", to_toml(config))
                record = {"format_version": FORMAT_VERSION, **state, "world_size": ctx.world_size}
                record["python_rng"] = _jsonable(random.getstate())
                atomic.write_json(tmp / "trainer_state" / "state.json", record)
        except (OSError, dcp.api.CheckpointException) as e:
            error = e
    if ctx.any(error is not None):
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(folder, warn=False) if folder.is_dir() else None
        kept = f"; the previous checkpoint {prev.name} is intact" if prev else ""
        why = _reason(error) if error is not None else "another rank failed to write its shard"
        raise UserError(f"could not write checkpoint {final}: {why}{kept}") from error
    if int(os.environ.get(KILL_IN_CHECKPOINT_ENV, "0")) == step and ctx.is_main:
        os.kill(os.getpid(), signal.SIGKILL)
    if ctx.is_main:
        atomic.write_json(tmp / MARKER, {"step": step, "time": time.time()})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        atomic.fsync_dir(folder)
        for old in complete_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it runs in one process when there is no process group; that is what we asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _rng_state() -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def _jsonable(obj: Any) -> Any:
    return [_jsonable(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _tuples(obj: Any) -> Any:
    return tuple(_tuples(o) for o in obj) if isinstance(obj, list) else obj


# ----- load -----------------------------------------------------------------------------------------------
def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: Distributed | None = None
) -> dict[str, Any]:
    """Restore weights, optimizer and this rank's RNG states from `path` (a collective call); returns the
    trainer state (step, tokens, data position, ...). Works at any world size and parallel strategy."""
    ctx = ctx or Distributed()
    state = read_state(path)
    msd, osd = get_state_dict(model, optimizer)
    loaded: dict[str, Any] = {"model": msd, "optim": osd}
    reader = _SafeReader(path / "trainer_state" / "dcp")
    reader.read_metadata()  # refuses a tampered metadata file here, with our message, before DCP reads it
    try:
        with _quiet_single_process():
            dcp.load(loaded, storage_reader=reader, planner=_SafeLoadPlanner(), no_dist=not ctx.active)
    except dcp.api.CheckpointException as e:
        raise UserError(f"could not read the training state of {path}: {_reason(e)}") from e
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    rng_file = path / "trainer_state" / f"rank-{ctx.rank:05d}.safetensors"
    saved_world = int(state.get("world_size", 1))
    if rng_file.is_file() and saved_world == ctx.world_size:
        rng = load_file(rng_file)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        random.setstate(_tuples(state["python_rng"]))
    else:  # another world size: weights, optimizer and data position carry over; RNG streams restart
        torch.manual_seed(int(state["step"]) * 1_000_003 + ctx.rank)
        if ctx.is_main:
            print(
                f"note: {path.name} was written by {saved_world} rank(s), resuming on {ctx.world_size}: "
                "RNG streams restart (the run is no longer bit-identical to an uninterrupted one)",
                flush=True,
            )
    state.pop("python_rng", None)
    return state


def read_state(path: Path) -> dict[str, Any]:
    """The checkpoint's state.json, after checking the marker and the format version."""
    if not (path / MARKER).is_file():
        raise UserError(f"{path} is not a complete checkpoint (no {MARKER} marker); use --resume auto")
    state_file = path / "trainer_state" / "state.json"
    state = json.loads(state_file.read_text(encoding="utf-8")) if state_file.is_file() else {}
    if state.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: checkpoint format version {state.get('format_version')} is not {FORMAT_VERSION}; "
            "it was written by another bigmodel version (load its model directory with from_pretrained instead)"
        )
    return dict(state)


def check_compatible(path: Path, config: RunConfig) -> list[str]:
    """Refuse a checkpoint of another task or model config; return the train fields that differ."""
    saved = load_toml(path / "config.toml")
    if saved.task != config.task:
        raise UserError(f"checkpoint {path} is from task {saved.task!r}, not {config.task!r}; start a new --out")
    model_diff = diff_configs(saved.model, config.model, "model")
    if model_diff:
        raise UserError(
            f"checkpoint {path} was trained with another model config ({'; '.join(model_diff)}); "
            "resume with the same --preset/--config/--set, or start a new --out"
        )
    return diff_configs(saved.train, config.train, "train")


# ----- reading DCP files without unpickling arbitrary objects ------------------------------------------------
class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and plain values only: anything else in the file is refused, not executed."""

    ALLOWED_PREFIXES = ("torch.distributed.checkpoint.",)
    ALLOWED = {
        ("collections", "OrderedDict"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # maps a layout name such as "torch.strided" to the layout
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(self.ALLOWED_PREFIXES) or (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UserError(f"refusing to unpickle {module}.{name} from a checkpoint file: not checkpoint metadata")


class _SafeReader(dcp.FileSystemReader):
    """DCP's reader, with the metadata file read by the restricted unpickler instead of pickle.load."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _RestrictedUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """DCP stores non-tensor values (optimizer hyper-parameters) as torch.save bytes; read them weights-only."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
