"""SAEBench's feature-composition score (its `meta_structure` eval, after Bussmann et al. 2024,
"Showing SAE latents are not atomic using meta-SAEs"): how much of the decoder is built from a
few shared parts. A BatchTopK meta-SAE a quarter as wide as the SAE, k = 4, is trained on the
SAE's decoder rows (1500 steps of 1024 rows drawn with replacement, Adam at a constant 5e-4, no
warm-up, inputs as they are); the score is the fraction of the rows' variance about their mean
that it reconstructs. High means latents are combinations of shared meta-latents (less atomic);
a decoder of random directions scores near the meta-SAE's share of dimensions.

The meta-SAE is trained by our own trainer (train.fit on the rows), not SAELens's as SAEBench
does, so the two scores agree to the spread of training, not to rounding:
tests/eval/test_saebench_agreement.py runs SAEBench's eval on the same SAEs and states the gap.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from sae.models import SAE


@dataclass
class MetaConfig:
    """SAEBench 0.6's MetaStructureEvalConfig defaults."""

    width_ratio: float = 0.25
    k: int = 4
    steps: int = 1500
    batch_size: int = 1024
    lr: float = 5e-4
    seed: int = 42


def decoder_rows(decoder: Tensor, cfg: MetaConfig) -> Iterator[Tensor]:
    """cfg.steps batches of rows drawn uniformly with replacement (SAEBench's data provider)."""
    g = torch.Generator(decoder.device).manual_seed(cfg.seed)
    for _ in range(cfg.steps):
        yield decoder[
            torch.randint(0, len(decoder), (cfg.batch_size,), generator=g, device=decoder.device)
        ]


@torch.no_grad()
def variance_explained(meta: SAE, decoder: Tensor, batch_size: int = 4096) -> float:
    """1 - Σ‖row - meta(row)‖² / Σ‖row - mean row‖²."""
    residual = sum(float(((b - meta(b)) ** 2).sum()) for b in decoder.split(batch_size))
    total = float(((decoder - decoder.mean(0)) ** 2).sum())
    return 1 - residual / total if total else 0.0


def meta_sae_score(sae: SAE, cfg: MetaConfig | None = None, device: str = "cpu") -> dict:
    """Train the meta-SAE on `sae`'s decoder and score it."""
    from train import fit

    cfg = cfg or MetaConfig()
    decoder = sae.W_dec.detach().float().to(device)
    width = max(math.ceil(len(decoder) * cfg.width_ratio), cfg.k)
    if width >= len(decoder):
        raise ValueError(
            f"a meta-SAE of {width} latents for {len(decoder)} decoder rows explains them by "
            "copying: use a width_ratio below 1 and an SAE wider than 4 * k"
        )
    with tempfile.TemporaryDirectory() as out:
        meta = fit(decoder_rows(decoder, cfg), architecture="batchtopk", k=cfg.k, d_sae=width,
                   lr=cfg.lr, warmup_steps=0, decay_fraction=0.0, batch_size=cfg.batch_size,
                   total_tokens=cfg.steps * cfg.batch_size, normalize=False, b_dec_init="zeros",
                   dead_tokens=2000 * cfg.batch_size, seed=cfg.seed, device=device,
                   out=out)  # fmt: skip
    return {
        "decoder_fraction_variance_explained": variance_explained(meta.eval(), decoder),
        "meta_d_sae": width,
        "k": cfg.k,
        "steps": cfg.steps,
    }
