"""Sequence to sequence (`--task seq2seq`): `seq2seq` (Transformer) or `rnn-seq2seq` on source -> target pairs.

Data (`--data`): `numbers`, `dates` (built-in, exact answers) or TSV `source<TAB>target` (data/seq2seq.py).
Text is byte-tokenized (the project's char Tokenizer: any UTF-8 round-trips); the model's vocabulary is the
257 byte/end tokens plus start and pad (models/decoding.py's convention). Source = bytes + end; target =
start + bytes + end. Loss: teacher-forced cross-entropy; metrics: exact match (headline), character error
rate and BLEU of the decoded validation outputs (greedy, or beam search with model.num_beams > 1).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bigmodel.config import RNNSeq2SeqConfig, RunConfig, Seq2SeqConfig, arch_of
from bigmodel.data.seq2seq import Pair, load_pairs
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.errors import UserError
from bigmodel.metrics import bleu, character_error_rate, exact_match
from bigmodel.models.decoding import special_ids
from bigmodel.models.directory import PretrainedModel
from bigmodel.models.rnn_seq2seq import RNNSeq2Seq
from bigmodel.models.seq2seq import Seq2SeqTransformer
from bigmodel.tasks.base import Batch
from bigmodel.tasks.examples import ExampleStream, ExampleTask, eval_chunks, to_device

EVAL_BATCH = 200


class Seq2SeqTask(ExampleTask):
    name = "seq2seq"
    metric = "exact_match"
    higher_is_better = True

    def __init__(self, config: RunConfig, data: str | Path) -> None:
        super().__init__(config, data)
        model = config.model
        if not isinstance(model, (Seq2SeqConfig, RNNSeq2SeqConfig)):
            raise UserError(f"task seq2seq trains seq2seq or rnn-seq2seq models, not {arch_of(model)!r}")
        self.pairs = load_pairs(data)
        self.tokenizer = Tokenizer.char()
        vocab = self.tokenizer.vocab_size + 2  # + start and pad; the tokenizer's end token is the model's end
        if model.vocab_size is not None and model.vocab_size != vocab:
            raise UserError(f"model.vocab_size={model.vocab_size} is not the byte vocabulary's {vocab}; remove it")
        model.vocab_size = vocab
        self.eos, self.bos, self.pad = special_ids(vocab)
        assert self.eos == self.tokenizer.eot_id
        self.train = self._encode(self.pairs.train, "training")
        self.val = self._encode(self.pairs.val, "validation")

    def _encode(self, pairs: list[Pair], split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        model = self.config.model
        assert isinstance(model, (Seq2SeqConfig, RNNSeq2SeqConfig))
        sources = self.tokenizer.encode_batch([s for s, _ in pairs])
        targets = self.tokenizer.encode_batch([t for _, t in pairs])
        out = []
        for i, (src, tgt) in enumerate(zip(sources, targets, strict=True)):
            for ids, limit, key in ((src, model.max_source_len, "source"), (tgt, model.max_target_len, "target")):
                if len(ids) > limit:
                    raise UserError(
                        f"{self.pairs.name}: {split} pair {i + 1} has a {key} of {len(ids)} bytes, more than "
                        f"model.max_{key}_len={limit}; raise it (--set model.max_{key}_len={len(ids)})"
                    )
            out.append((torch.tensor([*src, self.eos]), torch.tensor([self.bos, *tgt, self.eos])))
        return out

    def _collate(self, items: list[tuple[torch.Tensor, torch.Tensor]], idx: torch.Tensor) -> Batch:
        chosen = [items[i] for i in idx.tolist()]
        pad = torch.nn.utils.rnn.pad_sequence
        return {
            "source": pad([s for s, _ in chosen], batch_first=True, padding_value=self.pad),  # (B, S)
            "target": pad([t for _, t in chosen], batch_first=True, padding_value=self.pad),  # (B, T)
        }

    def build_model(self) -> nn.Module:
        model = self.config.model
        return Seq2SeqTransformer(model) if isinstance(model, Seq2SeqConfig) else RNNSeq2Seq(model)  # type: ignore[arg-type]

    def batches(self, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> ExampleStream:
        return self.stream(
            len(self.train), micro_batch, seed, lambda idx, _: self._collate(self.train, idx), rank, world_size
        )

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        _, loss = model(**batch, label_smoothing=self.config.train.label_smoothing)  # smoothing: training only
        return loss

    def decode_text(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, limit: int | None = None) -> dict[str, float]:
        assert isinstance(model, (Seq2SeqTransformer, RNNSeq2Seq))
        total = tokens = 0.0
        outputs, references = [], []
        for idx in eval_chunks(len(self.val), limit, EVAL_BATCH):
            batch = to_device(self._collate(self.val, idx), model)
            _, loss = model(**batch)
            n = float((batch["target"][:, 1:] != self.pad).sum())
            total, tokens = total + float(loss) * n, tokens + n
            outputs += [self.decode_text(ids) for ids in model.generate(batch["source"])]
            references += [self.pairs.val[i][1] for i in idx.tolist()]
        return {
            "loss": total / tokens,
            "exact_match": exact_match(outputs, references),
            "cer": character_error_rate(outputs, references),
            "bleu": bleu(outputs, references),
            "examples": float(len(references)),
        }

    def save(self, model: nn.Module, out: Path) -> None:
        assert isinstance(model, PretrainedModel)
        model.save_pretrained(out, self.tokenizer, task=self.name)

    def fingerprint(self) -> str:
        return self.pairs.fingerprint()

    def translate(self, model: nn.Module, sources: list[str], num_beams: int | None = None) -> list[str]:
        """Decode raw source strings with a trained model (what `bigmodel eval` prints samples of)."""
        assert isinstance(model, (Seq2SeqTransformer, RNNSeq2Seq))
        items = [
            (torch.tensor([*ids, self.eos]), torch.tensor([self.bos])) for ids in self.tokenizer.encode_batch(sources)
        ]
        batch = to_device(self._collate(items, torch.arange(len(items))), model)
        return [self.decode_text(ids) for ids in model.generate(batch["source"], num_beams=num_beams)]
