"""`rnn-seq2seq`: the classic recurrent encoder-decoder with attention, over byte tokens.

Encoder: embeddings -> bidirectional GRU/LSTM (`n_layer` layers, hidden/2 per direction) -> annotations
h_1..h_S (B, S, H). The decoder's first state is tanh(W [mean of the annotations]). Each decoder step:
  * Bahdanau (additive, 2015): score_j = v^T tanh(W_s s_{t-1} + W_h h_j); context c_t = sum_j a_j h_j;
    s_t = cell([embed(y_{t-1}); c_t], s_{t-1}); logits from [s_t; c_t; embed(y_{t-1})].
  * Luong (multiplicative "general", 2015): s_t = cell([embed(y_{t-1}); h~_{t-1}], s_{t-1}) (input feeding);
    score_j = s_t^T W h_j; c_t = sum_j a_j h_j; h~_t = tanh(W_c [c_t; s_t]); logits from h~_t.
The output projection maps to the embedding width and is tied to the (shared) embedding matrix when
`tie_embeddings`. Decoding (greedy / beam search) is models/decoding.py's, as for the Transformer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bigmodel.config import RNNSeq2SeqConfig
from bigmodel.models.decoding import special_ids
from bigmodel.models.directory import PretrainedModel
from bigmodel.models.seq2seq import decode
from bigmodel.nn.losses import classification_loss

Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # GRU: h; LSTM: (h, c)


@dataclass
class RNNState:
    annotations: torch.Tensor  # (B, S, H) encoder outputs
    keys: torch.Tensor  # (B, S, A) annotations projected for scoring (W_h h_j, or W h_j for Luong)
    mask: torch.Tensor  # (B, S) True at real source tokens
    hidden: Hidden  # decoder cell state, (B, H) each
    feed: torch.Tensor  # (B, H): Luong's attentional vector h~_{t-1} (zeros for Bahdanau)


class RNNSeq2Seq(PretrainedModel):
    config_class = RNNSeq2SeqConfig
    task = "seq2seq"

    def __init__(self, config: RNNSeq2SeqConfig) -> None:
        super().__init__(config)
        if config.vocab_size is None:
            raise ValueError("RNNSeq2SeqConfig.vocab_size is None: set it from the tokenizer")
        c, V, H, E = config, config.vocab_size, config.hidden, config.n_embd
        self.eos, self.bos, self.pad = special_ids(V)
        self.lstm = c.cell == "lstm"
        self.luong = c.attention == "luong"
        self.src_embed = nn.Embedding(V, E)
        self.tgt_embed = self.src_embed if c.tie_embeddings else nn.Embedding(V, E)
        rnn = nn.LSTM if self.lstm else nn.GRU
        self.encoder = rnn(
            E, H // 2, c.n_layer, batch_first=True, bidirectional=True, dropout=c.dropout * (c.n_layer > 1)
        )
        self.init_state = nn.Linear(H, H)
        cell = nn.LSTMCell if self.lstm else nn.GRUCell
        self.cell = cell(E + H, H)  # input: the previous token's embedding and the context (or h~)
        if self.luong:
            self.score = nn.Linear(H, H, bias=False)  # "general": s^T W h
            self.combine = nn.Linear(2 * H, H)  # h~ = tanh(W_c [c; s])
            self.out = nn.Linear(H, E)
        else:
            self.W_h = nn.Linear(H, H, bias=False)
            self.W_s = nn.Linear(H, H)
            self.v = nn.Linear(H, 1, bias=False)
            self.out = nn.Linear(2 * H + E, E)
        self.drop = nn.Dropout(c.dropout)
        self.lm_head = nn.Linear(E, V, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tgt_embed.weight

    # ----- encoder ---------------------------------------------------------------------------------------
    def start(self, source: torch.Tensor) -> RNNState:
        """source (B, S) -> the state the decoder starts from (StepModel protocol)."""
        mask = source != self.pad  # (B, S)
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.drop(self.src_embed(source)), lengths, batch_first=True, enforce_sorted=False
        )
        out, _ = self.encoder(packed)
        annotations, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=source.shape[1])
        m = mask[..., None].to(annotations.dtype)
        mean = (annotations * m).sum(1) / m.sum(1).clamp(min=1)  # (B, H)
        h0 = torch.tanh(self.init_state(mean))
        hidden: Hidden = (h0, torch.zeros_like(h0)) if self.lstm else h0
        keys = self.score(annotations) if self.luong else self.W_h(annotations)  # (B, S, H)
        return RNNState(annotations, keys, mask, hidden, torch.zeros_like(h0))

    # ----- decoder ---------------------------------------------------------------------------------------
    def _attend(self, query: torch.Tensor, state: RNNState) -> torch.Tensor:
        """Attention weights (B, S) of a query (B, H) over the source annotations."""
        if self.luong:
            scores = torch.einsum("bh,bsh->bs", query, state.keys)  # s_t^T W h_j
        else:
            scores = self.v(torch.tanh(state.keys + self.W_s(query)[:, None, :])).squeeze(-1)  # (B, S)
        return scores.masked_fill(~state.mask, -torch.inf).softmax(-1)

    def _logits(self, tokens: torch.Tensor, state: RNNState) -> tuple[torch.Tensor, RNNState]:
        """One decoder step: previous tokens (B,) -> logits (B, V) and the next state."""
        emb = self.drop(self.tgt_embed(tokens))  # (B, E)
        prev = state.hidden[0] if isinstance(state.hidden, tuple) else state.hidden
        if self.luong:
            hidden = self.cell(torch.cat([emb, state.feed], -1), state.hidden)
            s = hidden[0] if isinstance(hidden, tuple) else hidden  # (B, H)
            context = torch.einsum("bs,bsh->bh", self._attend(s, state), state.annotations)
            feed = torch.tanh(self.combine(torch.cat([context, s], -1)))  # h~_t
            out = self.out(self.drop(feed))
        else:
            context = torch.einsum("bs,bsh->bh", self._attend(prev, state), state.annotations)  # (B, H)
            hidden = self.cell(torch.cat([emb, context], -1), state.hidden)
            s = hidden[0] if isinstance(hidden, tuple) else hidden
            feed = state.feed
            out = self.out(self.drop(torch.cat([s, context, emb], -1)))
        logits = self.lm_head(torch.tanh(out))  # (B, V)
        return logits, RNNState(state.annotations, state.keys, state.mask, hidden, feed)

    def step(self, tokens: torch.Tensor, state: RNNState) -> tuple[torch.Tensor, RNNState]:
        logits, state = self._logits(tokens, state)
        return logits.float().log_softmax(-1), state

    def reorder(self, state: RNNState, index: torch.Tensor) -> RNNState:
        hidden: Hidden = (
            (state.hidden[0][index], state.hidden[1][index]) if isinstance(state.hidden, tuple) else state.hidden[index]
        )
        return RNNState(state.annotations[index], state.keys[index], state.mask[index], hidden, state.feed[index])

    def forward(
        self, source: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing over target (B, T) = start, tokens, end, pad...: logits (B, T-1, V) and the mean loss."""
        state = self.start(source)
        steps = []
        for t in range(target.shape[1] - 1):
            logits, state = self._logits(target[:, t], state)
            steps.append(logits)
        logits = torch.stack(steps, 1)  # (B, T-1, V)
        loss = classification_loss(logits, target[:, 1:], label_smoothing, ignore_index=self.pad)
        return logits, loss

    @torch.no_grad()
    def generate(
        self, source: torch.Tensor, max_len: int | None = None, num_beams: int | None = None
    ) -> list[list[int]]:
        return decode(self, source, max_len or self.config.max_target_len + 1, num_beams or self.config.num_beams)
