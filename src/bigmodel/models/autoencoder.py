"""`autoencoder`: a sparse autoencoder, x -> code h (k units, mostly silent) -> reconstruction.

Encoder h = act(W x + b), decoder x' = V h + c, trained on mean squared error (over standardised features)
plus a sparsity term that keeps most code units silent for any one input:
  * `l1`: ReLU code, + l1 * mean |h| (activity regularisation: exact zeros);
  * `kl`: sigmoid code, + kl_weight * sum_j KL(rho || rho_hat_j), where rho_hat_j is unit j's mean
    activation over the batch and rho = kl_target (Ng's sparse autoencoder);
  * `none`: ReLU code, no penalty.
`tied = true` decodes with the encoder's weight transposed (V = W^T, one tensor: weight sharing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bigmodel.config import AutoencoderConfig
from bigmodel.models.directory import PretrainedModel
from bigmodel.models.mlp import Standardize


def kl_sparsity(codes: torch.Tensor, target: float) -> torch.Tensor:
    """sum_j KL(Bernoulli(target) || Bernoulli(mean activation of unit j)) for sigmoid codes (B, k)."""
    rho_hat = codes.float().mean(0).clamp(1e-6, 1 - 1e-6)  # (k,)
    rho = target
    return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()


class Autoencoder(PretrainedModel):
    config_class = AutoencoderConfig
    task = "autoencode"

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__(config)
        if config.in_features is None:
            raise ValueError("AutoencoderConfig.in_features is None: set it from the data")
        m, k = config.in_features, config.hidden
        self.scale = Standardize((m,), config.standardize)
        self.encoder = nn.Linear(m, k)
        self.decoder = None if config.tied else nn.Linear(k, m)
        self.decoder_bias = nn.Parameter(torch.zeros(m)) if config.tied else None

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Codes (B, k) of raw features (B, m)."""
        z = self.encoder(self.scale(features))  # (B, k)
        return torch.sigmoid(z) if self.config.sparsity == "kl" else F.relu(z)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Standardised reconstruction (B, m) of codes (B, k)."""
        if self.decoder is None:
            return F.linear(codes, self.encoder.weight.t(), self.decoder_bias)  # V = W^T: tied
        return self.decoder(codes)

    def penalty(self, codes: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.sparsity == "l1":
            return c.l1 * codes.abs().mean(0).sum()  # l1 * sum_j mean_b |h_bj|
        if c.sparsity == "kl":
            return c.kl_weight * kl_sparsity(codes, c.kl_target)
        return codes.new_zeros(())

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(raw reconstruction (B, m), codes (B, k), training loss = mean squared error + sparsity penalty)."""
        target = self.scale(features)  # (B, m)
        codes = self.encode(features)  # (B, k)
        recon = self.decode(codes)  # (B, m)
        loss = F.mse_loss(recon.float(), target.float()) + self.penalty(codes)
        return self.scale.inverse(recon), codes, loss

    @torch.no_grad()
    def reconstruction_error(self, features: torch.Tensor) -> torch.Tensor:
        """Per-example mean squared error (B,) in standardised units (what the loss minimises, without the penalty)."""
        recon = self.decode(self.encode(features))
        return ((recon - self.scale(features)) ** 2).mean(-1)
