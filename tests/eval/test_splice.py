"""Spliced-in LM loss on SmolLM2 with a quickly trained SAE."""

import pytest
import torch

from eval.splice import spliced_losses
from sae.hooks import splice


@torch.no_grad()
def test_error_term_reproduces_clean_ce(smollm2, trained_sae, heldout_ids):
    model = smollm2[0]
    clean = model(heldout_ids, labels=heldout_ids).loss
    with splice(model, trained_sae, error_term=True):
        spliced = model(heldout_ids, labels=heldout_ids).loss
    torch.testing.assert_close(spliced, clean, atol=1e-5, rtol=1e-5)


def test_trained_sae_scores_between_zero_ablation_and_clean(smollm2, trained_sae, heldout_ids):
    scores = spliced_losses(smollm2[0], trained_sae, heldout_ids.split(4))
    assert scores["tokens"] == 8 * 62
    assert scores["ce_clean"] < scores["ce_sae"] < scores["ce_zero_ablation"]
    assert scores["ce_clean"] < scores["ce_mean_ablation"]
    assert 0 < scores["ce_loss_recovered"] < 1 and 0 < scores["kl_score"] < 1
    expected = (scores["ce_zero_ablation"] - scores["ce_sae"]) / (
        scores["ce_zero_ablation"] - scores["ce_clean"]
    )
    assert scores["ce_loss_recovered"] == pytest.approx(expected)


@torch.no_grad()
def test_clean_ce_matches_transformers_own_loss_on_scored_tokens(smollm2, trained_sae, heldout_ids):
    """Our CE is the model's mean next-token loss, less the prediction made at BOS."""
    model = smollm2[0]
    labels = heldout_ids.clone()
    labels[:, 1] = -100  # the token predicted from position 0 is not scored
    reference = model(heldout_ids, labels=labels).loss.item()
    assert spliced_losses(model, trained_sae, [heldout_ids])["ce_clean"] == pytest.approx(
        reference, rel=1e-5
    )
