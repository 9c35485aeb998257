"""Reconstruction quality over many tokens, accumulated batch by batch (bounded memory).

    FVU = sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2     explained variance = 1 - FVU

The denominator is centred over all scored tokens (DESIGN), as SAELens >= 6.x computes it too
(its `explained_variance_legacy` averages a per-token ratio instead). Two variants are reported
beside it: the uncentred one (denominator sum_t ||x_t||^2) and SAEBench's core-eval
`explained_variance`, whose denominator is E||x||^2 - (E||x||^2 / d)^2: it subtracts the square
of the mean squared element where the centred form subtracts ||mean(x)||^2, so on a residual
stream with a large mean it sits close to the uncentred one. docs/eval.md compares them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from sae.models import SAE


class ReconstructionStats:
    """Running sums: add(x, x_hat) per batch, result() at the end."""

    def __init__(self) -> None:
        self.n = 0
        # sums of x - shift (the first token): the centred variance below is a difference of two
        # sums, which loses digits when the mean is large against the spread
        self.shift: Tensor | None = None
        self.sum_x: Tensor | float = 0.0  # sum (x - shift)
        self.sum_sq = 0.0  # sum ||x - shift||^2
        self.sum_raw_sq = 0.0  # sum ||x||^2
        self.sum_err = 0.0  # sum ||x - x_hat||^2
        self.sum_cos = 0.0
        self.sum_ratio = 0.0
        self.d = 0

    @torch.no_grad()
    def add(self, x: Tensor, x_hat: Tensor) -> None:
        """x, x_hat: [..., d], every leading index a token."""
        x, x_hat = x.flatten(0, -2).double(), x_hat.flatten(0, -2).double()
        if not len(x):
            return
        if self.shift is None:
            self.shift = x[0]
        self.n += len(x)
        self.d = x.shape[-1]
        self.sum_x = self.sum_x + (x - self.shift).sum(0)
        self.sum_sq += (x - self.shift).pow(2).sum().item()
        self.sum_raw_sq += x.pow(2).sum().item()
        self.sum_err += (x - x_hat).pow(2).sum().item()
        self.sum_cos += torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum().item()
        self.sum_ratio += (x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum().item()

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no tokens were evaluated")
        mean = self.sum_x / self.n
        centred = self.sum_sq - self.n * float(mean.pow(2).sum())
        # constant inputs: nothing to explain, so FVU is undefined (nan), not a crash of the report
        fvu = self.sum_err / centred if centred > 0 else float("nan")
        square = self.sum_raw_sq / self.n  # E||x||^2
        saebench = square - (square / self.d) ** 2
        return {
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "explained_variance_uncentred": 1 - self.sum_err / self.sum_raw_sq,
            "explained_variance_saebench": 1 - self.sum_err / self.n / saebench,
            "mse": self.sum_err / (self.n * self.d),
            "cosine": self.sum_cos / self.n,
            "l2_ratio": self.sum_ratio / self.n,
        }


@torch.no_grad()
def reconstruction(sae: SAE, batches: Iterable[Tensor]) -> dict[str, float]:
    """FVU, explained variance, MSE (per element), mean cosine and mean L2 norm ratio of x_hat to x."""
    stats = ReconstructionStats()
    for x in batches:
        x = x.to(sae.W_enc.device).float()
        stats.add(x, sae(x))
    return stats.result()
