"""Spliced-in LM loss on SmolLM2 with a quickly trained SAE."""

from itertools import islice

import pytest
import torch

import train
from eval.splice import spliced_losses
from sae.hooks import splice
from train.data import load_documents, token_windows
from train.harvest import harvest

HOOK = "blocks.6.hook_resid_post"


@pytest.fixture(scope="module")
def heldout_ids(smollm2):
    windows = islice(
        token_windows(smollm2[1], enumerate(load_documents("shakespeare", "test")), 64), 8
    )
    return torch.stack([torch.from_numpy(w.tokens) for w in windows])


@pytest.fixture(scope="module")
def trained_sae(tmp_path_factory):
    out = tmp_path_factory.mktemp("splice")
    cache = harvest(
        out=str(out / "cache"),
        hook=[HOOK],
        tokens=16_384,
        context_size=64,
        shard_windows=64,
        dtype="float32",
        device="cpu",
    )
    return train.fit(
        cache.url,
        architecture="topk",
        k=32,
        expansion_factor=4,
        total_tokens=16_384,
        batch_size=2048,
        lr=4e-3,
        warmup_steps=1,
        out=str(out / "run"),
    )


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
