"""The SAE inside the model: next-token CE loss clean, with the reconstruction spliced in, and with
the activation zero- or mean-ablated, on the same tokens; CE loss recovered and KL score from them.

    ce_loss_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)
    kl_score          = (KL_zero - KL_sae) / KL_zero          KL(clean || variant), mean per token

Position 0 (BOS) is never edited, and predictions made at position 0 are not counted, so every
variant is scored on exactly the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sae.hooks import edit, record, splice
from sae.models import SAE


def _keep_first(fn):
    """Apply fn to positions 1.. only (position 0 is the attention sink, left as it is)."""
    return lambda x: torch.cat([x[:, :1], fn(x[:, 1:])], dim=1)


def _scored(logits: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token log-probs and CE for predictions from positions 1..n-2 of the next token."""
    logp = F.log_softmax(logits[:, 1:-1].float(), dim=-1)  # [batch, n-2, vocab]
    ce = -logp.gather(-1, ids[:, 2:, None]).squeeze(-1)
    return logp, ce


@torch.no_grad()
def spliced_losses(
    model: nn.Module, sae: SAE, batches: Iterable[Tensor], hook: str | None = None
) -> dict[str, float]:
    """CE clean / with the SAE / zero-ablated / mean-ablated, CE loss recovered and KL score,
    averaged over every scored token of `batches` ([batch, seq] token ids starting with BOS)."""
    hook = hook or sae.cfg.hook_name
    sums = {
        k: 0.0
        for k in (
            "ce_clean",
            "ce_sae",
            "ce_zero_ablation",
            "ce_mean_ablation",
            "kl_sae",
            "kl_zero_ablation",
            "kl_mean_ablation",
        )
    }
    n = 0
    for ids in batches:
        clean_logp, clean_ce = _scored(model(ids).logits, ids)
        mean = _mean_activation(model, ids, hook)
        variants: dict[str, AbstractContextManager] = {
            "sae": splice(model, sae, hook),
            "zero_ablation": edit(model, hook, _keep_first(torch.zeros_like)),
            "mean_ablation": edit(
                model, hook, _keep_first(lambda x, m=mean: m.to(x.dtype).expand_as(x))
            ),
        }
        sums["ce_clean"] += clean_ce.sum().item()
        for name, context in variants.items():
            with context:
                logp, ce = _scored(model(ids).logits, ids)
            sums[f"ce_{name}"] += ce.sum().item()
            sums[f"kl_{name}"] += (clean_logp.exp() * (clean_logp - logp)).sum(-1).sum().item()
        n += clean_ce.numel()
    if n == 0:
        raise ValueError(
            "no tokens to score: windows need at least 3 tokens (BOS, context, target)"
        )
    out = {k: v / n for k, v in sums.items()}
    out["ce_loss_recovered"] = (out["ce_zero_ablation"] - out["ce_sae"]) / (
        out["ce_zero_ablation"] - out["ce_clean"]
    )
    out["kl_score"] = (out["kl_zero_ablation"] - out["kl_sae"]) / out["kl_zero_ablation"]
    out["tokens"] = n
    return out


def _mean_activation(model: nn.Module, ids: Tensor, hook: str) -> Tensor:
    """The activation's mean over this batch's positions 1.. (the mean-ablation value)."""
    with record(model, [hook]) as acts:
        model(ids)
    return acts[hook][:, 1:].flatten(0, -2).mean(0)
