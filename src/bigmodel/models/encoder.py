"""`encoder`: a BERT-style Transformer encoder, pretrained as a masked language model, fine-tuned to classify.

tokens (B, T) -> token + learned position embeddings -> n_layer pre-norm blocks [bidirectional
self-attention (padding masked), feed-forward] -> LayerNorm -> hidden states (B, T, C), then one head:
  * masked-LM (n_classes unset): dense -> GELU -> LayerNorm -> projection tied to the token embeddings
    (+ a bias): logits (B, T, V) for the masked positions;
  * classifier (n_classes set): mean of the hidden states over real tokens -> dropout -> linear: (B, classes).
The vocabulary is the tokenizer's plus two ids at its end: [MASK] (V-2) and [PAD] (V-1). A classifier is
started from a pretrained masked-LM's trunk with `model.init_from` (see tasks/classify.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bigmodel.config import EncoderConfig
from bigmodel.models.directory import PretrainedModel
from bigmodel.models.seq2seq import EncoderBlock
from bigmodel.nn.losses import classification_loss

IGNORE = -100  # label of positions without a prediction target (F.cross_entropy's ignore_index)


def encoder_special_ids(vocab_size: int) -> tuple[int, int]:
    """(mask, pad) ids: the vocabulary's last two."""
    return vocab_size - 2, vocab_size - 1


class MLMHead(nn.Module):
    def __init__(self, c: EncoderConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(c.n_embd, c.n_embd)
        self.ln = nn.LayerNorm(c.n_embd)
        self.decoder = nn.Linear(c.n_embd, embedding.num_embeddings)
        self.decoder.weight = embedding.weight  # tied to the input embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.ln(F.gelu(self.dense(x))))  # (B, T, V)


class Encoder(PretrainedModel):
    config_class = EncoderConfig
    task = "mlm"
    TRUNK = ("wte.", "wpe.", "layers.", "ln_f.")  # what a classifier takes from a pretrained masked LM

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        if config.vocab_size is None:
            raise ValueError("EncoderConfig.vocab_size is None: set it from the tokenizer")
        c, V = config, config.vocab_size
        self.mask_id, self.pad_id = encoder_special_ids(V)
        self.wte = nn.Embedding(V, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList([EncoderBlock(c) for _ in range(c.n_layer)])
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.apply(self._init)
        self.mlm: MLMHead | None = None
        self.classifier: nn.Linear | None = None
        if c.n_classes is None:
            self.mlm = MLMHead(c, self.wte)
        else:
            self.classifier = nn.Linear(c.n_embd, c.n_classes)

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks (what FSDP shards one by one)."""
        return list(self.layers)

    def saved_task(self) -> str:
        return "mlm" if self.config.n_classes is None else "classify"

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, T) -> hidden states (B, T, C) and the real-token mask (B, T)."""
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise ValueError(f"input of {T} tokens is longer than block_size={self.config.block_size}")
        real = input_ids != self.pad_id  # (B, T)
        x = self.drop(self.wte(input_ids) + self.wpe(torch.arange(T, device=input_ids.device)))  # (B, T, C)
        attn_mask = real[:, None, None, :]  # (B, 1, 1, T): no token attends to padding
        for block in self.layers:
            x = block(x, attn_mask)
        return self.ln_f(x), real

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Masked LM: labels (B, T), IGNORE where nothing is predicted -> logits (B, T, V).
        Classifier: labels (B,) class ids -> logits (B, classes). Returns (logits, mean loss or None)."""
        h, real = self.hidden_states(input_ids)
        if self.mlm is not None:
            logits = self.mlm(h)
            loss = None
            if labels is not None:
                loss = classification_loss(logits, labels, label_smoothing, ignore_index=IGNORE)
            return logits, loss
        assert self.classifier is not None
        m = real[..., None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)  # (B, C): mean over real tokens
        logits = self.classifier(self.drop(pooled))  # (B, classes)
        return logits, classification_loss(logits, labels, label_smoothing) if labels is not None else None

    @torch.no_grad()
    def predict(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self(input_ids)[0].argmax(-1)
