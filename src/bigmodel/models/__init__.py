"""Model architectures, registered by name (`model.arch`), and `load_model` for any model directory."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from bigmodel.errors import UserError
from bigmodel.models.autoencoder import Autoencoder
from bigmodel.models.directory import PretrainedModel, read_config_json
from bigmodel.models.encoder import Encoder
from bigmodel.models.gpt import GPT
from bigmodel.models.mlp import MLP
from bigmodel.models.multi_input import MultiInput
from bigmodel.models.rnn_seq2seq import RNNSeq2Seq
from bigmodel.models.seq2seq import Seq2SeqTransformer

MODELS: dict[str, type[nn.Module]] = {
    "gpt": GPT,
    "mlp": MLP,
    "multi-input": MultiInput,
    "seq2seq": Seq2SeqTransformer,
    "rnn-seq2seq": RNNSeq2Seq,
    "encoder": Encoder,
    "autoencoder": Autoencoder,
}


def model_arch(path: str | Path) -> str:
    """The arch of the model directory at `path` ("gpt" for GPT-2 directories, ours or transformers')."""
    meta = read_config_json(path)
    if meta.get("model_type") == "gpt2":
        return "gpt"
    arch = meta.get("arch")
    if arch not in MODELS:
        raise UserError(f"{path}: unknown model type {meta.get('model_type')!r}; bigmodel reads {', '.join(MODELS)}")
    return str(arch)


def load_model(path: str | Path) -> nn.Module:
    """Any bigmodel model directory, as the class its config.json names."""
    arch = model_arch(path)
    if arch == "gpt":
        return GPT.from_pretrained(path)
    cls = MODELS[arch]
    assert issubclass(cls, PretrainedModel)
    return cls.from_pretrained(path)


__all__ = [
    "GPT",
    "MLP",
    "MODELS",
    "Autoencoder",
    "Encoder",
    "MultiInput",
    "PretrainedModel",
    "RNNSeq2Seq",
    "Seq2SeqTransformer",
    "load_model",
    "model_arch",
]
