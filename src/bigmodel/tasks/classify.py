"""Classification (`--task classify`): feature arrays with `mlp` / `multi-input`, or text with `encoder`.

Data (`--data`): `digits`, `breast-cancer`, a .npy/.csv file or folder (data/arrays.py) for the feature
models; `genre` (Shakespeare passages, data/genre.py), or a `text<TAB>label` .tsv file or folder with
train.tsv (+ val.tsv), for the encoder. Loss: cross-entropy; metric: accuracy on the validation split.
The saved model directory carries the class names (config.json `labels`) and, for feature models, the
training set's standardisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from bigmodel.config import EncoderConfig, MLPConfig, MultiInputConfig, RunConfig, arch_of
from bigmodel.data.arrays import load_arrays
from bigmodel.data.genre import TextData, load_genre
from bigmodel.data.seq2seq import load_pairs
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.errors import UserError
from bigmodel.metrics import accuracy
from bigmodel.models.directory import PretrainedModel, load_weights, read_config_json
from bigmodel.models.encoder import Encoder
from bigmodel.models.mlp import MLP, Classifier
from bigmodel.models.multi_input import MultiInput
from bigmodel.tasks.base import Batch
from bigmodel.tasks.examples import ExampleStream, ExampleTask, eval_chunks, to_device

EVAL_BATCH = 256


class ClassifyTask(ExampleTask):
    name = "classify"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, config: RunConfig, data: str | Path) -> None:
        super().__init__(config, data)
        model = config.model
        self.tokenizer: Tokenizer | None = None
        if isinstance(model, EncoderConfig):
            self.text = load_text(data)
            self.labels = self.text.labels
            self._setup_text(model)
        elif isinstance(model, (MLPConfig, MultiInputConfig)):
            self.arrays = load_arrays(data, need_labels=True)
            self.labels = self.arrays.labels
            self._setup_arrays(model)
        else:
            raise UserError(f"task classify trains mlp, multi-input or encoder models, not {arch_of(model)!r}")
        if len(self.labels) < 2:
            raise UserError(f"{data}: classification needs at least 2 classes, found {len(self.labels)}")
        model.n_classes = len(self.labels)

    # ----- setup ---------------------------------------------------------------------------------------
    def _setup_arrays(self, model: MLPConfig | MultiInputConfig) -> None:
        d = self.arrays
        self.x_train, self.x_val = torch.from_numpy(d.x_train), torch.from_numpy(d.x_val)
        assert d.y_train is not None and d.y_val is not None
        self.y_train, self.y_val = torch.from_numpy(d.y_train), torch.from_numpy(d.y_val)
        shape = d.x_train.shape[1:]
        if isinstance(model, MLPConfig):
            model.in_features = _set_or_check(model.in_features, int(np.prod(shape)), "model.in_features", d.name)
            self.x_train, self.x_val = self.x_train.flatten(1), self.x_val.flatten(1)
            return
        if len(shape) == 2:
            model.n_inputs = _set_or_check(model.n_inputs, shape[0], "model.n_inputs", d.name)
            model.in_features = _set_or_check(model.in_features, shape[1], "model.in_features", d.name)
            return
        if model.n_inputs is None or shape[0] % model.n_inputs:
            raise UserError(
                f"{d.name} has {shape[0]} features per sample: set model.n_inputs to how many inputs they split "
                f"into (a divisor of {shape[0]}), or pass a 3-D array (samples, inputs, features)"
            )
        model.in_features = _set_or_check(model.in_features, shape[0] // model.n_inputs, "model.in_features", d.name)

    def _setup_text(self, model: EncoderConfig) -> None:
        if model.init_from:
            meta = read_config_json(model.init_from)
            if meta.get("arch") != "encoder":
                raise UserError(f"model.init_from={model.init_from} is not an encoder model directory")
            shape = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "d_ff")
            for key in shape:  # the classifier has the pretrained trunk's shape
                setattr(model, key, meta[key])
            if model.tokenizer:
                raise UserError(
                    f"model.tokenizer={model.tokenizer} and model.init_from are both set: a pretrained encoder "
                    "keeps its own tokenizer; drop model.tokenizer"
                )
            self.tokenizer = Tokenizer.from_pretrained(model.init_from)
        elif model.tokenizer:  # e.g. a BPE trained on the training text by `bigmodel prepare`
            self.tokenizer = Tokenizer.from_pretrained(model.tokenizer)
        else:
            self.tokenizer = Tokenizer.char()
        vocab = self.tokenizer.vocab_size + 2  # + [MASK] and [PAD]
        model.vocab_size = _set_or_check(model.vocab_size, vocab, "model.vocab_size", "the tokenizer")
        self.pad_id = vocab - 1
        self.train_ids = self._encode([t for t, _ in self.text.train], model.block_size)
        self.val_ids = self._encode([t for t, _ in self.text.val], model.block_size)
        self.y_train = torch.tensor([label for _, label in self.text.train])
        self.y_val = torch.tensor([label for _, label in self.text.val])

    def _encode(self, texts: list[str], block_size: int) -> list[torch.Tensor]:
        assert self.tokenizer is not None
        eot = [self.tokenizer.eot_id]  # an empty text still has one token (attention needs a key)
        return [torch.tensor(ids[:block_size] or eot, dtype=torch.long) for ids in self.tokenizer.encode_batch(texts)]

    # ----- the Task contract -----------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        model = self.config.model
        if isinstance(model, EncoderConfig):
            encoder = Encoder(model)
            if model.init_from:
                weights = Path(model.init_from) / "model.safetensors"
                trunk = {k: v for k, v in load_file(weights).items() if k.startswith(Encoder.TRUNK)}
                missing = load_weights(encoder, trunk, str(weights), strict=False)
                assert all(k.startswith("classifier.") for k in missing), missing
            encoder.labels = list(self.labels)
            return encoder
        net: Classifier = MLP(model) if isinstance(model, MLPConfig) else MultiInput(model)  # type: ignore[arg-type]
        net.scale.fit(self.x_train.reshape(len(self.x_train), *net.scale.mean.shape))
        net.labels = list(self.labels)
        return net

    def _collate(self, x: Any, y: torch.Tensor, idx: torch.Tensor) -> Batch:
        if isinstance(x, list):  # token ids of different lengths: pad to the longest
            seqs = [x[i] for i in idx.tolist()]
            ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=self.pad_id)
            return {"input_ids": ids, "labels": y[idx]}
        return {"features": x[idx], "labels": y[idx]}

    def _inputs(self, split: str) -> tuple[Any, torch.Tensor]:
        if isinstance(self.config.model, EncoderConfig):
            return (self.train_ids, self.y_train) if split == "train" else (self.val_ids, self.y_val)
        return (self.x_train, self.y_train) if split == "train" else (self.x_val, self.y_val)

    def batches(self, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> ExampleStream:
        x, y = self._inputs("train")
        return self.stream(len(y), micro_batch, seed, lambda idx, _: self._collate(x, y, idx), rank, world_size)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        _, loss = model(**batch, label_smoothing=self.config.train.label_smoothing)  # smoothing: training only
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, limit: int | None = None) -> dict[str, float]:
        x, y = self._inputs("val")
        total, preds, labels = 0.0, [], []
        for idx in eval_chunks(len(y), limit, EVAL_BATCH):
            batch = to_device(self._collate(x, y, idx), model)
            logits, loss = model(**batch)
            total += float(loss) * len(idx)
            preds.append(logits.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
        n = sum(len(p) for p in preds)
        return {"loss": total / n, "accuracy": accuracy(torch.cat(preds), torch.cat(labels)), "examples": float(n)}

    def save(self, model: nn.Module, out: Path) -> None:
        assert isinstance(model, PretrainedModel)
        model.save_pretrained(out, self.tokenizer, task=self.name)

    def fingerprint(self) -> str:
        if isinstance(self.config.model, EncoderConfig):
            return self.text.fingerprint()
        return self.arrays.fingerprint()


def load_text(data: str | Path) -> TextData:
    """`genre`, or `text<TAB>label` lines in a .tsv file or a folder with train.tsv (+ val.tsv)."""
    if str(data) == "genre":
        return load_genre()
    pairs = load_pairs(data)
    names = sorted({label for _, label in pairs.train} | {label for _, label in pairs.val})
    index = {n: i for i, n in enumerate(names)}
    return TextData(
        pairs.name,
        [(t, index[label]) for t, label in pairs.train],
        [(t, index[label]) for t, label in pairs.val],
        names,
        [],
    )


def _set_or_check(current: int | None, found: int, key: str, source: str) -> int:
    if current is not None and current != found:
        raise UserError(
            f"{key}={current} (from the config or the model) does not match {source}, which has {found}; "
            "use data of the model's shape, or drop the setting"
        )
    return found
