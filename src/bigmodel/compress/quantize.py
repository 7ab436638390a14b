"""Int8 weight-only quantization for inference.

Every Linear weight W (out, in) is stored as int8 with one fp32 scale per output row
(symmetric, scale = max|W_row| / 127); activations stay in floating point. Weights take a quarter of the
fp32 bytes, which is what bounds decoding speed at small batch sizes.
"""

from __future__ import annotations

import torch
from torch import nn

from bigmodel.models.gpt import GPT


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (out, in) float -> (int8 (out, in), scales (out,)) with W ~= int8 * scales[:, None]."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """y = x @ (int8 weight * row scales).T + bias, computed without materialising the float weight."""

    weight_int8: torch.Tensor  # (out, in) int8
    scales: torch.Tensor  # (out,) fp32

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        q, scales = quantize_rows(weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (..., in)
        x2 = x.reshape(-1, shape[-1])
        y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scales.to(x2.dtype))  # (M, out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales[:, None]


def quantize_int8(model: GPT) -> GPT:
    """Replace every Linear (the tied output head included) by Int8Linear, in place; returns the model.

    The token embedding stays in floating point (a lookup reads one row per token), so the tie is cut:
    the output head gets its own int8 copy.
    """
    model.float().eval()
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], Int8Linear(linear.weight, linear.bias))
    return model


def int8_error(weight: torch.Tensor) -> float:
    """Relative Frobenius error of the int8 approximation of `weight` (for reports and tests)."""
    q, s = quantize_rows(weight)
    return float(torch.linalg.norm(q.float() * s[:, None] - weight.float()) / torch.linalg.norm(weight.float()))


__all__ = ["Int8Linear", "int8_error", "quantize_int8", "quantize_rows"]
