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


def _ratio(recovered: float, ablated: float) -> float:
    """nan where zero ablation changes nothing (the hook does not reach the logits): there is no
    loss to recover, and one metric without meaning should not crash the whole report."""
    return recovered / ablated if ablated != 0 else float("nan")


VARIANTS = ("sae", "zero_ablation", "mean_ablation")


def sae_variants(model: nn.Module, sae: SAE, acts: Tensor) -> dict[str, AbstractContextManager]:
    """The edited passes of one dictionary: spliced in, zero- and mean-ablated at its output hook
    (a transcoder's: the MLP's output). `acts`: that hook's activation [batch, seq, d] in the clean
    pass (for the mean)."""
    mean = acts[:, 1:].flatten(0, -2).mean(0)
    hook = sae.cfg.hook_name_out  # where the prediction goes (an SAE's own hook)
    return {
        "sae": splice(model, sae, hook),
        "zero_ablation": edit(model, hook, _keep_first(torch.zeros_like)),
        "mean_ablation": edit(model, hook, _keep_first(lambda x: mean.to(x.dtype).expand_as(x))),
    }


class SplicedLosses:
    """Running sums over batches: add(model, ids, clean_logits, variants) per batch, result().

    The caller runs the clean forward (recording the activations the evaluation needs anyway), so
    each batch costs one clean and one forward per variant. `main` names the variant scored
    against zero ablation (CE loss recovered, KL score)."""

    def __init__(self, main: str = "sae") -> None:
        self.main = main
        self.sums: dict[str, float] = {"ce_clean": 0.0}
        self.n = 0

    @torch.no_grad()
    def add(
        self,
        model: nn.Module,
        ids: Tensor,
        clean_logits: Tensor,
        variants: dict[str, AbstractContextManager],
    ) -> None:
        clean_logp, clean_ce = _scored(clean_logits, ids)
        self.sums["ce_clean"] += clean_ce.sum().item()
        for name, context in variants.items():
            with context:
                logp, ce = _scored(model(ids).logits, ids)
            kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1).sum().item()
            self.sums[f"ce_{name}"] = self.sums.get(f"ce_{name}", 0.0) + ce.sum().item()
            self.sums[f"kl_{name}"] = self.sums.get(f"kl_{name}", 0.0) + kl
        self.n += clean_ce.numel()

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError(
                "no tokens to score: windows need at least 3 tokens (BOS, context, target)"
            )
        out = {k: v / self.n for k, v in self.sums.items()}
        main = self.main
        out["ce_loss_recovered"] = _ratio(
            out["ce_zero_ablation"] - out[f"ce_{main}"], out["ce_zero_ablation"] - out["ce_clean"]
        )
        out["kl_score"] = _ratio(
            out["kl_zero_ablation"] - out[f"kl_{main}"], out["kl_zero_ablation"]
        )
        out["tokens"] = self.n
        return out


@torch.no_grad()
def spliced_losses(model: nn.Module, sae: SAE, batches: Iterable[Tensor]) -> dict[str, float]:
    """CE clean / with the SAE / zero-ablated / mean-ablated, CE loss recovered and KL score,
    averaged over every scored token of `batches` ([batch, seq] token ids starting with BOS)."""
    losses = SplicedLosses()
    for ids in batches:
        with record(model, [sae.cfg.hook_name_out]) as acts:
            logits = model(ids).logits
        losses.add(model, ids, logits, sae_variants(model, sae, acts[sae.cfg.hook_name_out]))
    return losses.result()
