"""Toy activations with known features, and how well an SAE recovers them.

Real activations come with no answer key. Here x = codes @ features + noise, with known unit
directions `features` [n_features, d] and sparse non-negative `codes`, so a dictionary can be
checked against the truth. The knobs (SyntheticConfig) are what makes real dictionary learning
hard: a power law of firing frequencies (rare features get few samples), superposition
(n_features > d), correlated firing, and parent/child hierarchies (which invite absorption).

`recovery` scores, with cos[i, j] the cosine of true feature i and latent j's decoder row (signed:
a latent points one way, its activations are non-negative), and "live" latents those that fire
on the fresh samples scored:

    mmcs_features       mean_i max over live j of cos[i, j]: is every feature represented by
                        some latent that fires? A decoder row on a feature whose latent never
                        fires represents nothing (the SAE cannot use it), so dead latents are
                        left out; with no live latent at all a feature scores 0.
    mmcs_latents        mean over live j of max_i cos[i, j]: is every latent a true feature?
                        Dead latents say nothing about the dictionary, so they are left out.
    fraction_recovered  share of features i with max over live j of cos[i, j] >
                        recovered_threshold (0.9).
    mcc                 Pearson correlation of every feature's codes with every latent's
                        activations, features matched one-to-one to latents by the Hungarian
                        algorithm (largest total correlation), averaged over all features; an
                        unmatched feature (d_sae < n_features) or a silent latent counts 0. Cosines
                        only check directions; this checks that the latent fires when, and as
                        much as, its feature does (the identifiability score of ICA).
    split_features      features with >= 2 live latents j where cos[i, j] > split_threshold (0.8)
                        and i is j's best feature: the SAE spends several latents on one feature.
                        0.8 is well above the 0.71 of a half-and-half mix of two features, such as
                        an absorbing latent, which is absorption rather than splitting.
    absorption          per (parent, child) pair (Chanin et al. 2024, "A is for Absorption"): the
                        parent's latent is its best-cosine one; among samples where the child
                        fires, the share where that latent is silent while a latent with
                        cos > absorption_threshold (0.5) to the child fires. The child's latent has
                        then taken over the parent's job exactly where the child is, which an MSE +
                        sparsity objective rewards (one latent instead of two). 0.5 admits the
                        typical absorbing decoder normalize(parent + child), cosine 0.71 with each.
                        `child_latent_parent_cosine`, the cosine of the child's best latent with the
                        parent direction, is the same story on the decoder side (~0.7 vs ~0).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torch.nn import functional as F

from sae.models import SAE


@dataclass
class SyntheticConfig:
    """Toy activations x = codes @ features + noise (module docstring). Features are ordered:
    parents first (the most frequent), then the other free features, then the children last."""

    n_features: int = 512
    """True features; more than d makes them overcomplete (superposition)."""
    d: int = 64
    """Activation width (the SAE's d_in)."""
    mean_active: float = 5.0
    """Expected number of active features per sample, children included (a TopK SAE's natural k)."""
    exponent: float = 0.5
    """Firing probabilities of the free (non-child) features follow p_i ∝ (i + 1)^-exponent,
    scaled to `mean_active` and clipped at 1; 0 makes them all equal."""
    magnitude_std: float = 0.5
    """An active feature's magnitude is |N(1, magnitude_std)|: positive, mean about 1."""
    correlation: float = 0.0
    """Correlated firing, in [0, 1]: a free feature fires when a Gaussian exceeds its quantile
    (Gaussian copula, marginals unchanged), and the Gaussians have correlation matrix
    (1 - correlation) I + correlation L L^T with random unit rows L. 0: independent."""
    correlation_rank: int = 8
    """Columns of L: hidden factors that features fire together along (positively or not)."""
    n_hierarchies: int = 0
    """Parent features (indices 0..n_hierarchies-1), each with `children_per_parent` children."""
    children_per_parent: int = 2
    """Children of a parent are mutually exclusive and fire only with their parent."""
    child_probability: float = 0.5
    """P(one of a parent's children fires | the parent fires); which one is uniform."""
    noise: float = 0.0
    """Standard deviation of isotropic Gaussian noise added to x."""
    seed: int = 0
    """Seed of the directions, the correlation factors and the default sample stream."""

    @property
    def n_free(self) -> int:
        """Features that fire on their own (all but the children)."""
        return self.n_features - self.n_hierarchies * self.children_per_parent

    def __post_init__(self) -> None:
        for name in ("n_features", "d", "correlation_rank", "children_per_parent"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("exponent", "magnitude_std", "noise", "n_hierarchies"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if not 0 <= self.correlation <= 1:
            raise ValueError(f"correlation must be in [0, 1], got {self.correlation}")
        if not 0 < self.child_probability <= 1:
            raise ValueError(f"child_probability must be in (0, 1], got {self.child_probability}")
        if self.n_hierarchies > self.n_free:
            raise ValueError(
                f"{self.n_hierarchies} parents with {self.children_per_parent} children each need "
                f"{self.n_hierarchies * (self.children_per_parent + 1)} features, n_features is {self.n_features}"
            )
        most = self.n_free + self.n_hierarchies * self.child_probability  # every free feature fires
        if not 0 < self.mean_active <= most:
            raise ValueError(f"mean_active must be in (0, {most}], got {self.mean_active}")


def firing_probabilities(cfg: SyntheticConfig) -> Tensor:
    """[n_free] float64: p_i = min(1, s (i + 1)^-exponent), the scale s found by bisection so that
    the expected number of active features is mean_active; a parent counts 1 + child_probability
    for the child it brings along."""
    w = torch.arange(1, cfg.n_free + 1, dtype=torch.float64) ** -cfg.exponent
    per_firing = torch.ones_like(w)
    per_firing[: cfg.n_hierarchies] += cfg.child_probability
    lo, hi = 0.0, 1 / w[-1].item()  # at hi every probability is 1
    for _ in range(100):
        mid = (lo + hi) / 2
        expected = ((mid * w).clamp(max=1) * per_firing).sum()
        lo, hi = (mid, hi) if expected < cfg.mean_active else (lo, mid)
    return (hi * w).clamp(max=1)


class SyntheticData:
    """A sampler of toy activations with its answer key: `features` [n_features, d] (unit rows),
    `frequencies` [n_features] (marginal firing probabilities, children included) and `hierarchy`
    ((parent, child) pairs). Built from a config and/or SyntheticConfig fields as keywords."""

    def __init__(self, cfg: SyntheticConfig | None = None, **fields: Any):
        self.cfg = c = replace(cfg or SyntheticConfig(), **fields)
        g = self.generator = torch.Generator().manual_seed(c.seed)  # then the sample stream
        self.features = F.normalize(torch.randn(c.n_features, c.d, generator=g), dim=1)
        # [n_free, rank], drawn even when unused so that changing `correlation` keeps the features
        self.loadings = F.normalize(torch.randn(c.n_free, c.correlation_rank, generator=g), dim=1)
        p = firing_probabilities(c)  # [n_free]
        self.threshold = (-torch.special.ndtri(p)).float()  # a standard normal exceeds it w.p. p
        child_p = p[: c.n_hierarchies] * c.child_probability / c.children_per_parent
        self.frequencies = torch.cat([p, child_p.repeat_interleave(c.children_per_parent)]).float()
        self.hierarchy = [
            (parent, c.n_free + parent * c.children_per_parent + j)
            for parent in range(c.n_hierarchies)
            for j in range(c.children_per_parent)
        ]

    @property
    def latent_correlation(self) -> Tensor:
        """[n_free, n_free]: the correlation of the Gaussians whose exceedances fire the free features."""
        rho = self.cfg.correlation
        return (1 - rho) * torch.eye(self.cfg.n_free) + rho * self.loadings @ self.loadings.T

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x [n, d], codes [n, n_features]), from `generator` or else the data's own stream."""
        c, g = self.cfg, generator or self.generator
        gauss = torch.randn(n, c.n_free, generator=g)
        if c.correlation:
            # still unit variance, as the loadings' rows are unit vectors
            shared = torch.randn(n, c.correlation_rank, generator=g) @ self.loadings.T
            gauss = math.sqrt(1 - c.correlation) * gauss + math.sqrt(c.correlation) * shared
        fires = gauss > self.threshold  # [n, n_free]
        fires = torch.cat([fires, self.child_firing(fires[:, : c.n_hierarchies], g)], dim=1)
        magnitudes = (1 + c.magnitude_std * torch.randn(n, c.n_features, generator=g)).abs()
        codes = fires * magnitudes  # [n, n_features]
        x = codes @ self.features  # [n, d]
        if c.noise:
            x = x + c.noise * torch.randn(n, c.d, generator=g)
        return x, codes

    def child_firing(self, parent_fires: Tensor, generator: torch.Generator) -> Tensor:
        """[n, n_hierarchies] bool -> [n, n_hierarchies * children_per_parent] bool: an active
        parent brings exactly one of its children with probability child_probability."""
        c = self.cfg
        u = torch.rand(parent_fires.shape, generator=generator)  # [n, n_hierarchies]
        which = (u / c.child_probability * c.children_per_parent).long()  # meaningful where u < p
        on = parent_fires & (u < c.child_probability)
        one_hot = which[..., None] == torch.arange(c.children_per_parent)  # [n, parents, children]
        return (on[..., None] & one_hot).flatten(1)

    def batches(
        self, batch_size: int, total: int | None = None, generator: torch.Generator | None = None
    ) -> Iterator[Tensor]:
        """x [batch_size, d] batches, `total` rows in all (the last may be short) or endless;
        an iterable that `train.fit` takes as it is."""
        left = math.inf if total is None else total
        while left > 0:
            n = min(batch_size, left)
            yield self.sample(n, generator)[0]
            left -= n


# -- recovery scores ------------------------------------------------------------------------------
def feature_cosines(features: Tensor, sae: SAE) -> Tensor:
    """[n_features, d_sae]: cosine of every true feature with every decoder row."""
    directions = F.normalize(sae.W_dec.detach().float(), dim=1)  # [d_sae, d_in]
    return F.normalize(features.to(directions), dim=1) @ directions.T


def best_live_cosines(cos: Tensor, live: Tensor) -> Tensor:
    """[n_features]: each feature's best cosine with a live latent (0 when none is live)."""
    return cos.masked_fill(~live, -math.inf).max(1).values.nan_to_num(neginf=0.0)


def mmcs_features(cos: Tensor, live: Tensor) -> float:
    return best_live_cosines(cos, live).mean().item()


def mmcs_latents(cos: Tensor, live: Tensor) -> float:
    """0 when no latent is live."""
    return cos.max(0).values[live].mean().nan_to_num(0.0).item()


def fraction_recovered(cos: Tensor, live: Tensor, threshold: float = 0.9) -> float:
    return (best_live_cosines(cos, live) > threshold).float().mean().item()


def mcc(correlation: Tensor) -> float:
    """Mean over features of the correlation with the latent matched one-to-one to it (Hungarian,
    largest total correlation); features left without a latent count 0."""
    c = correlation.double().cpu().numpy()  # [n_features, d_sae]
    rows, cols = linear_sum_assignment(c, maximize=True)
    return float(c[rows, cols].sum() / c.shape[0])


def split_features(cos: Tensor, live: Tensor, threshold: float = 0.8) -> list[dict[str, Any]]:
    """[{"feature": i, "latents": [j, ...]}] for features with >= 2 live latents close to them
    (cos > threshold) that have them as their best feature."""
    own = cos.argmax(0) == torch.arange(len(cos), device=cos.device)[:, None]  # [n_features, d_sae]
    close = (cos > threshold) & own & live
    return [
        {"feature": i, "latents": close[i].nonzero().flatten().tolist()}
        for i in (close.sum(1) >= 2).nonzero().flatten().tolist()
    ]


class CrossCorrelation:
    """Pearson correlation of every column of a with every column of b, from running sums in
    float64 over batches (memory bounded by one batch). A constant column correlates 0."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: tuple[Tensor, ...] = ()

    def add(self, a: Tensor, b: Tensor) -> None:
        a, b = a.double(), b.double()
        sums = (a.sum(0), b.sum(0), a.pow(2).sum(0), b.pow(2).sum(0), a.T @ b)
        if self.sums:
            sums = tuple(s + t for s, t in zip(self.sums, sums, strict=True))
        self.sums, self.n = sums, self.n + len(a)

    def result(self) -> Tensor:
        mean_a, mean_b, sq_a, sq_b, ab = (s / self.n for s in self.sums)
        cov = ab - mean_a[:, None] * mean_b  # [a columns, b columns]
        scale = (variance(sq_a, mean_a)[:, None] * variance(sq_b, mean_b)).sqrt()
        return torch.where(scale > 0, cov / scale, 0.0)


def variance(mean_square: Tensor, mean: Tensor) -> Tensor:
    """E[x^2] - E[x]^2, with what rounding leaves of a constant column's zero set to 0."""
    var = mean_square - mean**2
    return var.where(var > 1e-9 * mean_square, 0.0)


class Activity(NamedTuple):
    correlation: Tensor
    """[n_features, d_sae] Pearson correlation of true codes and latent activations."""
    live: Tensor
    """[d_sae] bool: the latent fired on at least one sample."""
    child_active: Tensor
    """[n_pairs] samples where the pair's child fired."""
    absorbed: Tensor
    """[n_pairs] of those, samples where the parent's latent was silent and a child latent fired."""


def activity(
    sae: SAE,
    data: SyntheticData,
    n: int,
    batch_size: int,
    generator: torch.Generator,
    pairs: Tensor,
    parent_latent: Tensor,
    child_latents: Tensor,
) -> Activity:
    """One pass of the SAE over n fresh samples, batch by batch. pairs [n_pairs, 2] (parent,
    child); parent_latent [n_pairs]; child_latents [n_pairs, d_sae] bool: close to the child."""
    device = sae.W_dec.device
    correlation = CrossCorrelation()
    live = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=device)
    child_active = torch.zeros(len(pairs), dtype=torch.long, device=device)
    absorbed = torch.zeros_like(child_active)
    for start in range(0, n, batch_size):
        x, codes = data.sample(min(batch_size, n - start), generator)
        codes = codes.to(device)
        z = sae.encode(x.to(device))  # [batch, d_sae]
        correlation.add(codes, z)
        fires = z > 0
        live |= fires.any(0)
        child_on = codes[:, pairs[:, 1]] > 0  # [batch, n_pairs]
        child_latent_fires = (fires.float() @ child_latents.T.float()) > 0  # [batch, n_pairs]
        child_active += child_on.sum(0)
        absorbed += (child_on & ~fires[:, parent_latent] & child_latent_fires).sum(0)
    return Activity(correlation.result(), live, child_active, absorbed)


def absorption_records(
    pairs: Tensor, cos: Tensor, parent_latent: Tensor, act: Activity
) -> list[dict[str, Any]]:
    """One record per (parent, child) pair; `absorption` is None when the child never fired."""
    child_latent = cos[pairs[:, 1]].argmax(1)  # [n_pairs]
    columns = zip(
        pairs.tolist(),
        parent_latent.tolist(),
        child_latent.tolist(),
        cos[pairs[:, 0], child_latent].tolist(),
        act.child_active.tolist(),
        act.absorbed.tolist(),
        strict=True,
    )
    return [
        {
            "parent": parent,
            "child": child,
            "parent_latent": p_latent,
            "child_latent": c_latent,
            "child_latent_parent_cosine": carried,
            "child_samples": n_child,
            "absorption": absorbed / n_child if n_child else None,
        }
        for (parent, child), p_latent, c_latent, carried, n_child, absorbed in columns
    ]


@torch.no_grad()
def recovery(
    sae: SAE,
    data: SyntheticData,
    n: int = 65_536,
    *,
    batch_size: int = 4096,
    seed: int = 1,
    recovered_threshold: float = 0.9,
    split_threshold: float = 0.8,
    absorption_threshold: float = 0.5,
) -> dict[str, Any]:
    """How well the SAE's dictionary matches the data's features (definitions in the module
    docstring), on n fresh samples drawn with `seed`, the same for every SAE scored. Keys:
    mmcs_features, mmcs_latents, fraction_recovered, mcc (floats); live_latents, samples (ints);
    split_features (list of {feature, latents}); absorption (mean over pairs whose child fired,
    None without any) and absorption_pairs (list of {parent, child, parent_latent, child_latent,
    child_latent_parent_cosine, child_samples, absorption})."""
    if data.cfg.d != sae.cfg.d_in:
        raise ValueError(
            f"the synthetic data has width d={data.cfg.d} but the SAE has d_in={sae.cfg.d_in}; "
            "score an SAE with the synthetic spec it was trained on"
        )
    cos = feature_cosines(data.features, sae)  # [n_features, d_sae]
    pairs = torch.tensor(data.hierarchy, dtype=torch.long, device=cos.device).view(-1, 2)
    parent_latent = cos[pairs[:, 0]].argmax(1)  # [n_pairs]
    child_latents = cos[pairs[:, 1]] > absorption_threshold  # [n_pairs, d_sae]
    generator = torch.Generator().manual_seed(seed)
    act = activity(sae, data, n, batch_size, generator, pairs, parent_latent, child_latents)
    pair_records = absorption_records(pairs, cos, parent_latent, act)
    fractions = [r["absorption"] for r in pair_records if r["absorption"] is not None]
    return {
        "mmcs_features": mmcs_features(cos, act.live),
        "mmcs_latents": mmcs_latents(cos, act.live),
        "fraction_recovered": fraction_recovered(cos, act.live, recovered_threshold),
        "mcc": mcc(act.correlation),
        "live_latents": int(act.live.sum()),
        "samples": n,
        "split_features": split_features(cos, act.live, split_threshold),
        "absorption": sum(fractions) / len(fractions) if fractions else None,
        "absorption_pairs": pair_records,
    }
