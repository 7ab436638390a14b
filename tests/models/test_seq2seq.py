"""Encoder-decoder models: the Transformer equals torch.nn.Transformer, cached decoding equals teacher forcing,
beam search equals exhaustive search on a toy model, and the RNN family decodes consistently."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from bigmodel.config import RNNSeq2SeqConfig, Seq2SeqConfig
from bigmodel.models import load_model
from bigmodel.models.decoding import beam_search, greedy, special_ids
from bigmodel.models.rnn_seq2seq import RNNSeq2Seq
from bigmodel.models.seq2seq import Seq2SeqTransformer

V = 20
EOS, BOS, PAD = special_ids(V)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(0, EOS, (3, 7), generator=g)
    source[0, 5:] = PAD  # padded rows
    source[2, 3:] = PAD
    target = torch.randint(0, EOS, (3, 6), generator=g)
    target[:, 0] = BOS
    target[1, 4], target[1, 5] = EOS, PAD
    return source, target


def _transformer(**kw: Any) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, max_source_len=10, max_target_len=10, n_encoder_layer=2, n_decoder_layer=2)
    cfg.update(n_head=2, n_embd=16, d_ff=32, dropout=0.0)
    cfg.update(kw)
    model = Seq2SeqTransformer(Seq2SeqConfig(**cfg))
    with torch.no_grad():  # spread the weights so that outputs differ clearly between positions
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.filterwarnings("ignore:enable_nested_tensor")
def test_transformer_equals_torch_nn_transformer() -> None:
    ours = _transformer()
    C = 16
    ref = nn.Transformer(C, 2, 2, 2, 32, dropout=0.0, activation="gelu", batch_first=True, norm_first=True).eval()
    with torch.no_grad():
        for mine, theirs in zip(ours.encoder, ref.encoder.layers, strict=True):
            _copy_attention(mine.attn, theirs.self_attn)
            _copy_block_rest(mine, theirs, [("ln_1", "norm1"), ("ln_2", "norm2")])
        for mine, theirs in zip(ours.decoder, ref.decoder.layers, strict=True):
            _copy_attention(mine.self_attn, theirs.self_attn)
            _copy_attention(mine.cross_attn, theirs.multihead_attn)
            _copy_block_rest(mine, theirs, [("ln_1", "norm1"), ("ln_2", "norm2"), ("ln_3", "norm3")])
        ref.encoder.norm.load_state_dict(ours.ln_enc.state_dict())
        ref.decoder.norm.load_state_dict(ours.ln_dec.state_dict())
    source, target = _batch()
    logits, _ = ours(source, target)
    src = ours._embed(ours.src_embed, source)
    tgt = ours._embed(ours.tgt_embed, target[:, :-1])
    T = tgt.shape[1]
    out = ref(
        src,
        tgt,
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(T),
        src_key_padding_mask=source == PAD,
        memory_key_padding_mask=source == PAD,
        tgt_is_causal=True,
    )
    assert_close(logits, ours.lm_head(out), atol=1e-5, rtol=1e-5)


def _copy_attention(mine: nn.Module, theirs: nn.MultiheadAttention) -> None:
    C = theirs.embed_dim
    theirs.in_proj_weight.copy_(torch.cat([mine.q.weight, mine.kv.weight]))
    theirs.in_proj_bias.copy_(torch.cat([mine.q.bias, mine.kv.bias]))
    theirs.out_proj.load_state_dict(mine.proj.state_dict())
    assert theirs.in_proj_weight.shape == (3 * C, C)


def _copy_block_rest(mine: nn.Module, theirs: nn.Module, norms: list[tuple[str, str]]) -> None:
    for a, b in norms:
        getattr(theirs, b).load_state_dict(getattr(mine, a).state_dict())
    theirs.linear1.load_state_dict(mine.ff[0].state_dict())
    theirs.linear2.load_state_dict(mine.ff[2].state_dict())


def _stepwise_logits(model: Any, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    state = model.start(source)
    out = []
    for t in range(target.shape[1] - 1):
        logp, state = model.step(target[:, t], state)
        out.append(logp)
    return torch.stack(out, 1)


def _rnn(**kw: Any) -> RNNSeq2Seq:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, max_source_len=10, max_target_len=10, n_embd=12, hidden=16, dropout=0.0)
    cfg.update(kw)
    return RNNSeq2Seq(RNNSeq2SeqConfig(**cfg)).eval()


MODELS = {
    "transformer": lambda: _transformer(),
    "transformer-untied": lambda: _transformer(tie_embeddings=False),
    "gru-bahdanau": lambda: _rnn(),
    "lstm-luong": lambda: _rnn(cell="lstm", attention="luong"),
    "gru-luong-2-layers": lambda: _rnn(attention="luong", n_layer=2),
    "lstm-bahdanau": lambda: _rnn(cell="lstm"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_step_decoding_equals_teacher_forcing(name: str) -> None:
    model = MODELS[name]()
    source, target = _batch()
    logits, loss = model(source, target)
    assert logits.shape == (3, 5, V)
    assert_close(_stepwise_logits(model, source, target), logits.log_softmax(-1), atol=1e-5, rtol=1e-5)
    # the loss ignores padded target positions
    mask = target[:, 1:] != PAD
    expected = nn.functional.cross_entropy(logits[mask], target[:, 1:][mask])
    assert_close(loss, expected)


@pytest.mark.parametrize("name", ["transformer", "lstm-luong"])
def test_padding_does_not_change_the_output(name: str) -> None:
    model = MODELS[name]()
    source, target = _batch()
    padded = torch.cat([source, torch.full((3, 4), PAD)], 1)
    assert_close(model(padded, target)[0], model(source, target)[0], atol=1e-5, rtol=1e-5)


def test_greedy_is_the_argmax_of_full_recomputation() -> None:
    model = _transformer()
    source, _ = _batch()
    out = model.generate(source, max_len=6, num_beams=1)
    for row in range(3):  # reference: re-run the whole decoder on the growing prefix, no cache
        prefix = [BOS]
        for _ in range(6):
            logits, _ = model(source[row : row + 1], torch.tensor([[*prefix, PAD]]))
            nxt = int(logits[0, -1].argmax())
            if nxt == EOS:
                break
            prefix.append(nxt)
        assert out[row] == prefix[1:]


class ToyMarkov:
    """A StepModel whose next-token log-probabilities depend on the last token only (a fixed table)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table.log_softmax(-1)  # (V, V)

    def start(self, source: torch.Tensor) -> torch.Tensor:
        return torch.zeros(source.shape[0], dtype=torch.long)

    def step(self, tokens: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.table[tokens], state

    def reorder(self, state: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return state[index]


def _exhaustive(model: ToyMarkov, bos: int, eos: int, max_len: int, alpha: float) -> list[int]:
    """Best sequence over all sequences of <= max_len tokens (ended, or cut at max_len), same scoring."""
    n = model.table.shape[0]
    best, best_score = None, -float("inf")
    for length in range(1, max_len + 1):
        for seq in itertools.product(range(n), repeat=length):
            if eos in seq[:-1]:
                continue
            logp, prev = 0.0, bos
            for tok in seq:
                logp += float(model.table[prev, tok])
                prev = tok
            if seq[-1] != eos and length < max_len:
                continue
            score = logp / length**alpha
            if score > best_score:
                best, best_score = list(seq[:-1] if seq[-1] == eos else seq), score
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(4))
def test_beam_search_finds_the_exhaustive_optimum_with_enough_beams(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, bos, eos, max_len = 4, 3, 2, 4  # tokens 0..3; 3 is only a start token in practice
    model = ToyMarkov(2.0 * torch.randn(n, n, generator=g))
    source = torch.zeros(1, 1, dtype=torch.long)
    expected = _exhaustive(model, bos, eos, max_len, alpha=1.0)
    got = beam_search(model, source, max_len, bos, eos, num_beams=n**max_len)
    assert got[0] == expected
    # one beam is greedy
    assert beam_search(model, source, max_len, bos, eos, num_beams=1) == greedy(model, source, max_len, bos, eos)


def test_beam_search_beats_greedy_on_a_trap() -> None:
    # from the start token: 0 looks best (p=.6) but every continuation of 0 is poor; 1 (p=.4) then ends surely
    logits = torch.full((4, 4), -20.0)
    logits[3, 0], logits[3, 1] = 0.6, 0.4
    logits[0, :] = 0.25  # uniform: any continuation of 0 has p=.25
    logits[1, 2] = 1.0  # 1 -> end with certainty
    model = ToyMarkov(logits.clamp(min=1e-9).log())
    source = torch.zeros(1, 1, dtype=torch.long)
    assert greedy(model, source, 3, bos=3, eos=2)[0][0] == 0
    assert beam_search(model, source, 3, bos=3, eos=2, num_beams=2)[0] == [1]


@pytest.mark.parametrize("name", ["transformer", "gru-bahdanau"])
def test_beam_search_runs_on_the_models_and_one_beam_is_greedy(name: str) -> None:
    model = MODELS[name]()
    source, _ = _batch()
    assert model.generate(source, 5, num_beams=1) == greedy(model, source, 5, BOS, EOS)
    beams = model.generate(source, 5, num_beams=3)
    assert len(beams) == 3 and all(len(b) <= 5 and EOS not in b for b in beams)


@pytest.mark.parametrize("name", ["transformer", "lstm-luong"])
def test_save_and_load_round_trip(name: str, tmp_path: Path) -> None:
    model = MODELS[name]()
    model.save_pretrained(tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert type(back) is type(model)
    source, target = _batch()
    assert_close(back(source, target)[0], model(source, target)[0])
    if model.config.tie_embeddings:  # one matrix for source, target and output, saved once
        assert back.lm_head.weight is back.src_embed.weight
