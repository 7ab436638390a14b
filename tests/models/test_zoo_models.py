"""The feature and text families: parameter formulas, standardisation, sparsity terms, padding, model directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from bigmodel.config import AutoencoderConfig, EncoderConfig, MLPConfig, MultiInputConfig
from bigmodel.errors import UserError
from bigmodel.models import GPT, load_model, model_arch
from bigmodel.models.autoencoder import Autoencoder, kl_sparsity
from bigmodel.models.encoder import IGNORE, Encoder
from bigmodel.models.mlp import MLP
from bigmodel.models.multi_input import MultiInput
from bigmodel.nn.connections import connection_params


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "connection, extra",
    [
        ("dense", {}),
        ("second-order", {"rank": 2}),
        ("second-order", {"rank": 0}),
        ("interactive", {"groups": 4}),
        ("sparse", {"density": 0.2}),
    ],
)
def test_mlp_parameters_follow_the_connection_formula(connection: str, extra: dict) -> None:
    cfg = MLPConfig(in_features=30, n_classes=3, hidden=8, n_hidden=2, connection=connection, **extra)
    model = MLP(cfg)
    kw = {k: v for k, v in extra.items()}
    expected = connection_params(connection, 30, 8, **kw) + connection_params(connection, 8, 8, **kw) + 8 * 3 + 3
    assert model.num_params() == n_params(model) == expected
    logits, loss = model(torch.randn(5, 30), torch.tensor([0, 1, 2, 0, 1]))
    assert logits.shape == (5, 3) and loss is not None and loss.ndim == 0


def test_mlp_standardises_with_training_statistics() -> None:
    torch.manual_seed(0)
    x = torch.randn(50, 4) * torch.tensor([1.0, 10.0, 100.0, 0.0]) + 7.0  # the last feature is constant
    model = MLP(MLPConfig(in_features=4, n_classes=2, n_hidden=0))
    model.scale.fit(x)
    z = model.scale(x)
    assert_close(z[:, :3].mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    assert_close(z[:, :3].std(0), torch.ones(3))
    assert torch.equal(z[:, 3], torch.zeros(50))  # constant: centred, not divided by zero
    # n_hidden = 0 is softmax regression on the standardised features
    assert_close(model(x)[0], model.head(z))


def test_multi_input_shares_its_extractor() -> None:
    shared = MultiInput(MultiInputConfig(n_inputs=3, in_features=10, n_classes=2, features=4, extractor_hidden=8))
    separate = MultiInput(
        MultiInputConfig(n_inputs=3, in_features=10, n_classes=2, features=4, extractor_hidden=8, shared=False)
    )
    extractor = (10 * 8 + 8) + (8 * 4 + 4)
    assert n_params(separate) - n_params(shared) == 2 * extractor  # three extractors instead of one
    x = torch.randn(6, 30)  # 2-D rows are split into the 3 inputs
    assert_close(shared(x)[0], shared(x.view(6, 3, 10))[0])
    # the same extractor sees each input: swapping two inputs swaps their features in the concat
    feats = shared.extract.extract(shared.scale(x.view(6, 3, 10)))
    ext = next(iter(shared.extract.extractors.values()))
    assert_close(feats[:, 1], ext(shared.scale(x.view(6, 3, 10))[:, 1]))


@pytest.mark.parametrize("merge", ["sum", "attention"])
def test_multi_input_order_free_merges(merge: str) -> None:
    torch.manual_seed(0)
    model = MultiInput(MultiInputConfig(n_inputs=3, in_features=5, n_classes=2, merge=merge, standardize=False))
    x = torch.randn(4, 3, 5)
    assert_close(model(x)[0], model(x[:, [2, 0, 1]])[0])  # sum and attention pooling ignore the order


def test_autoencoder_l1_and_tied_weights() -> None:
    torch.manual_seed(0)
    cfg = AutoencoderConfig(in_features=6, hidden=10, sparsity="l1", l1=0.5, tied=True, standardize=False)
    model = Autoencoder(cfg)
    assert n_params(model) == 6 * 10 + 10 + 6  # one weight matrix, two biases
    x = torch.randn(8, 6)
    recon, codes, loss = model(x)
    h = torch.relu(x @ model.encoder.weight.t() + model.encoder.bias)
    assert_close(codes, h)
    assert_close(recon, h @ model.encoder.weight + model.decoder_bias)  # V = W^T
    expected = ((recon - x) ** 2).mean() + 0.5 * h.abs().mean(0).sum()
    assert_close(loss, expected)


def test_kl_sparsity_equals_the_bernoulli_kl() -> None:
    codes = torch.rand(32, 5) * 0.9 + 0.05
    rho = 0.1
    ref = torch.distributions.kl_divergence(
        torch.distributions.Bernoulli(probs=torch.full((5,), rho)), torch.distributions.Bernoulli(probs=codes.mean(0))
    ).sum()
    assert_close(kl_sparsity(codes, rho), ref)
    model = Autoencoder(AutoencoderConfig(in_features=4, hidden=3, sparsity="kl"))
    assert (model.encode(torch.randn(5, 4)) > 0).all()  # sigmoid codes


def _encoder(n_classes: int | None = None) -> Encoder:
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=16, d_ff=32, dropout=0.0)
    cfg.n_classes = n_classes
    return Encoder(cfg).eval()


def test_encoder_padding_is_invisible() -> None:
    model = _encoder(n_classes=3)
    ids = torch.randint(0, 28, (2, 6))
    padded = torch.cat([ids, torch.full((2, 5), model.pad_id)], 1)
    h, _ = model.hidden_states(ids)
    hp, real = model.hidden_states(padded)
    assert_close(hp[:, :6], h, atol=1e-5, rtol=1e-5)
    assert real[:, 6:].sum() == 0
    assert_close(model(padded)[0], model(ids)[0], atol=1e-5, rtol=1e-5)  # mean pooling over real tokens only


def test_encoder_mlm_loss_covers_only_labelled_positions_and_ties_the_head() -> None:
    model = _encoder()
    assert model.mlm is not None and model.mlm.decoder.weight is model.wte.weight
    ids = torch.randint(0, 28, (2, 8))
    labels = torch.full((2, 8), IGNORE)
    labels[0, 3], labels[1, 5] = 7, 9
    logits, loss = model(ids, labels)
    expected = nn.functional.cross_entropy(logits[[0, 1], [3, 5]], torch.tensor([7, 9]))
    assert loss is not None
    assert_close(loss, expected)


def test_model_directories_round_trip_with_labels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP(MLPConfig(in_features=5, n_classes=3, connection="sparse", density=0.4))
    model.scale.fit(torch.randn(20, 5) * 3 + 1)
    model.labels = ["comedy", "history", "tragedy"]
    model.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["model_type"] == "bigmodel-mlp" and meta["arch"] == "mlp" and meta["task"] == "classify"
    assert meta["labels"] == model.labels and meta["connection"] == "sparse"
    back = load_model(tmp_path / "m")
    assert isinstance(back, MLP) and back.labels == model.labels
    x = torch.randn(4, 5)
    assert_close(back(x)[0], model.eval()(x)[0])  # standardisation and the sparse pattern come back too
    enc = _encoder(n_classes=None)
    enc.save_pretrained(tmp_path / "e")
    assert model_arch(tmp_path / "e") == "encoder"
    assert json.loads((tmp_path / "e" / "config.json").read_text())["task"] == "mlm"


def test_load_model_reads_gpt_directories(tmp_path: Path) -> None:
    from conftest import tiny_gpt

    tiny_gpt().save_pretrained(tmp_path / "g")
    assert model_arch(tmp_path / "g") == "gpt"
    assert isinstance(load_model(tmp_path / "g"), GPT)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UserError, match="unknown model type 'bert'"):
        load_model(tmp_path / "x")
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "w").mkdir()
    MLP(MLPConfig(in_features=5, n_classes=3)).save_pretrained(tmp_path / "w")
    (tmp_path / "w" / "config.json").write_text(
        (tmp_path / "w" / "config.json").read_text().replace('"hidden": 64', '"hidden": 32')
    )
    with pytest.raises(UserError, match="does not fit"):
        load_model(tmp_path / "w")


def test_transformer_families_list_their_blocks_for_fsdp() -> None:
    from bigmodel.config import Seq2SeqConfig
    from bigmodel.models.seq2seq import Seq2SeqTransformer
    from bigmodel.train.distributed import transformer_blocks

    enc = _encoder()
    assert transformer_blocks(enc) == list(enc.layers)
    s2s = Seq2SeqTransformer(Seq2SeqConfig(vocab_size=20, n_embd=16, n_head=2, d_ff=32))
    assert transformer_blocks(s2s) == [*s2s.encoder, *s2s.decoder]
