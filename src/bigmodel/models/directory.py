"""Model directories of the families other than GPT: config.json + model.safetensors (+ tokenizer files).

config.json holds `model_type` ("bigmodel-<arch>", so that no other library mistakes it for one of its
own), `arch`, the `task` it was trained for, every field of the family's config, and `labels` (class
names) where the model has them. model.safetensors holds each tensor once: tied weights are saved under
their first name and re-tied by the model's constructor on load. Nothing is pickled.

GPT directories stay Hugging Face GPT-2 directories (models/hf.py); `load_model` reads either kind.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_file
from torch import nn

from bigmodel import atomic
from bigmodel.errors import UserError
from bigmodel.nn.connections import tied_names, unique_state_dict

if TYPE_CHECKING:
    from bigmodel.data.tokenizer import Tokenizer

MODEL_TYPE_PREFIX = "bigmodel-"
T = TypeVar("T", bound="PretrainedModel")


def read_config_json(path: str | Path) -> dict[str, Any]:
    """A model directory's config.json, with a one-line error when it is missing or unreadable."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise UserError(f"{path} is not a model directory (no config.json)")
    return atomic.read_json_object(file)


class PretrainedModel(nn.Module):
    """Base of the zoo's models: `config`, `labels`, `save_pretrained` and `from_pretrained`, `num_params`."""

    config_class: ClassVar[type[Any]]
    task: ClassVar[str]  # the task a saved model of this class is evaluated with by default

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.labels: list[str] = []  # class names, for classifiers

    @property
    def arch(self) -> str:
        return str(self.config_class.arch)

    def saved_task(self) -> str:
        """The task a saved model is evaluated with by `bigmodel eval`."""
        return self.task

    def num_params(self) -> int:
        """Trainable parameters, each tied tensor once."""
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, path: str | Path, tokenizer: Tokenizer | None = None, task: str | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {
            "model_type": MODEL_TYPE_PREFIX + self.arch,
            "arch": self.arch,
            "task": task or self.saved_task(),
            **dataclasses.asdict(self.config),
        }
        if self.labels:
            meta["labels"] = list(self.labels)
        atomic.write_safetensors(path / "model.safetensors", unique_state_dict(self), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        atomic.write_json(path / "config.json", meta)

    @classmethod
    def from_pretrained(cls: type[T], path: str | Path) -> T:
        meta = read_config_json(path)
        arch = cls.config_class.arch
        if meta.get("arch") != arch:
            raise UserError(f"{path} holds a {meta.get('arch') or meta.get('model_type')!r} model, not {arch!r}")
        names = {f.name for f in dataclasses.fields(cls.config_class)}
        model = cls(cls.config_class(**{k: v for k, v in meta.items() if k in names}))
        model.labels = [str(x) for x in meta.get("labels", [])]
        weights = Path(path) / "model.safetensors"
        if not weights.is_file():
            raise UserError(f"{path} has no model.safetensors")
        load_weights(model, load_file(weights), str(weights))
        return model.eval()


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], where: str, strict: bool = True) -> list[str]:
    """Load tensors saved by `save_pretrained` (tied aliases may be absent); returns the keys left unset.

    With strict=False, keys of `model` that are not in the file are allowed (a new head on a pretrained
    trunk) and returned; keys in the file that `model` lacks are always an error.
    """
    aliases = set(tied_names(model))
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise UserError(f"{where} does not fit this model's config: {str(e).splitlines()[-1].strip()}") from e
    if unexpected:
        raise UserError(f"{where} has tensors this model does not: {', '.join(sorted(unexpected)[:5])}")
    missing = [k for k in missing if k not in aliases]
    if missing and strict:
        raise UserError(f"{where} lacks tensors of this model: {', '.join(sorted(missing)[:5])}")
    return missing
