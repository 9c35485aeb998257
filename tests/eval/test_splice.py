"""Spliced-in LM loss on SmolLM2 with a quickly trained SAE."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sae
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


def test_a_hook_that_changes_nothing_leaves_the_ratios_undefined():
    """Zero-ablating an activation that is zero anyway changes no logit: CE loss recovered and the
    KL score are 0 / 0, reported as nan (the other scores stand)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    torch.nn.init.zeros_(model.model.layers[0].self_attn.o_proj.weight)
    d = sae.create("topk", d_in=16, d_sae=64, k=4, hook_name="blocks.0.hook_attn_out")
    ids = torch.randint(2, 50, (2, 7))
    ids[:, 0] = 1
    scores = spliced_losses(model, d, [ids])
    assert scores["ce_zero_ablation"] == scores["ce_clean"] and scores["kl_zero_ablation"] == 0
    assert math.isnan(scores["ce_loss_recovered"]) and math.isnan(scores["kl_score"])
    assert scores["ce_sae"] > 0 and scores["tokens"] == 10
