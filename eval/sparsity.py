"""How sparse a dictionary is and how its latents share the work, accumulated batch by batch.

A latent is dead when it never fired on the evaluated tokens (so the verdict depends on how many
tokens were seen: the report states it), dense when it fires on more than `dense_threshold` of
them. Densities go into a log10 histogram, the picture researchers use to spot both failure modes
at once (dead latents at the far left, a dense bump near zero).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_DENSITY_EDGES = [-8.0 + 0.25 * i for i in range(33)]  # 10^-8 .. 10^0
"""Bin edges of the log10 firing-density histogram (dead latents are counted apart)."""


class SparsityStats:
    """Per-latent firing counts and the per-token L0 distribution: add(z) per batch, result()."""

    def __init__(self, d_sae: int) -> None:
        self.fires = torch.zeros(d_sae, dtype=torch.long)
        self.l0_counts = torch.zeros(d_sae + 1, dtype=torch.long)  # tokens with L0 == i
        self.n = 0

    @torch.no_grad()
    def add(self, z: Tensor) -> None:
        active = z.reshape(-1, z.shape[-1]) > 0
        self.fires += active.sum(0).cpu()
        self.l0_counts += torch.bincount(active.sum(-1).cpu(), minlength=len(self.l0_counts))
        self.n += len(active)

    def result(self, dense_threshold: float = 0.1) -> dict:
        if self.n == 0:
            raise ValueError("no tokens were evaluated")
        density = self.fires.double() / self.n
        values = torch.arange(len(self.l0_counts), dtype=torch.double)
        weights = self.l0_counts.double() / self.n
        l0 = float((values * weights).sum())
        alive = density[density > 0]
        hist = torch.histogram(alive.log10().float(), torch.tensor(LOG_DENSITY_EDGES)).hist
        top = int(self.l0_counts.nonzero().max()) + 1
        return {
            "l0": l0,
            "l0_std": math.sqrt(float(((values - l0) ** 2 * weights).sum())),
            "l0_quantiles": self._l0_quantiles([0.05, 0.25, 0.5, 0.75, 0.95]),
            "l0_histogram": self.l0_counts[:top].tolist(),
            "dead_fraction": float((density == 0).double().mean()),
            "dense_fraction": float((density > dense_threshold).double().mean()),
            "dense_threshold": dense_threshold,
            "density": density.tolist(),
            "log10_density_edges": LOG_DENSITY_EDGES,
            "log10_density_histogram": hist.long().tolist(),
            "tokens": self.n,
        }

    def _l0_quantiles(self, qs: list[float]) -> dict[str, int]:
        """Quantiles of L0 over tokens, read off the histogram (smallest L0 reaching q)."""
        cdf = self.l0_counts.cumsum(0).double() / self.n
        return {f"p{round(q * 100)}": int(torch.searchsorted(cdf, q)) for q in qs}
