"""classification_loss: label smoothing equal to torch's cross_entropy, padding ignored, wired into GPT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bigmodel.config import ConfigError, resolve_config
from bigmodel.nn.losses import classification_loss
from conftest import tiny_gpt


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_class_logits_equal_torch_cross_entropy(eps: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(12, 7, generator=g) * 3, torch.randint(0, 7, (12,), generator=g)
    torch.testing.assert_close(classification_loss(logits, y, eps), F.cross_entropy(logits, y, label_smoothing=eps))
    for reduction in ("sum", "none"):
        torch.testing.assert_close(
            classification_loss(logits, y, eps, reduction=reduction),
            F.cross_entropy(logits, y, label_smoothing=eps, reduction=reduction),
        )


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_token_logits_with_padding_equal_torch_cross_entropy(eps: float) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g, requires_grad=True)  # (B, T, V)
    y = torch.randint(0, 11, (3, 5), generator=g)
    y[0, 3:] = -1  # padding
    y[2, :] = -1  # a wholly padded row
    ours = classification_loss(logits, y, eps, ignore_index=-1)
    ref = F.cross_entropy(logits.flatten(0, 1), y.flatten(), label_smoothing=eps, ignore_index=-1)
    torch.testing.assert_close(ours, ref)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref)
    assert float(g_ours[2].abs().sum()) == 0.0  # padding gets no gradient, smoothing or not
    per_token = classification_loss(logits, y, eps, ignore_index=-1, reduction="none")
    assert per_token.shape == (3, 5) and float(per_token[2].detach().abs().sum()) == 0.0
    torch.testing.assert_close(per_token.sum() / (y != -1).sum(), ours)


def test_smoothing_formula_and_bf16_logits() -> None:
    """Against the target distribution (1 - eps) * one_hot + eps / C written out by hand."""
    g = torch.Generator().manual_seed(2)
    logits, y, eps = torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g), 0.25
    target = (1 - eps) * F.one_hot(y, 4).float() + eps / 4
    expected = -(target * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(classification_loss(logits, y, eps), expected)
    loss = classification_loss(logits.bfloat16(), y, eps)  # computed in fp32 whatever the logits' dtype
    assert loss.dtype == torch.float32


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"label_smoothing=1\.0 must be in \[0, 1\)"):
        classification_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="do not match"):
        classification_loss(torch.zeros(2, 5, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"train\.label_smoothing=1\.5 is invalid: expected a float in \[0, 1\)"):
        resolve_config("tiny", None, ["train.label_smoothing=1.5"])
    assert resolve_config("tiny", None, ["train.label_smoothing=0.1"]).train.label_smoothing == 0.1


def test_gpt_loss_takes_label_smoothing_and_defaults_to_plain_cross_entropy() -> None:
    model = tiny_gpt(vocab_size=40)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 40, (2, 9), generator=g), torch.randint(0, 40, (2, 9), generator=g)
    logits, plain = model(x, y)
    assert plain is not None
    torch.testing.assert_close(plain, F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    _, smooth = model(x, y, label_smoothing=0.1)
    assert smooth is not None
    torch.testing.assert_close(smooth, F.cross_entropy(logits.flatten(0, 1), y.flatten(), label_smoothing=0.1))
    assert float(smooth.detach()) != float(plain.detach())
