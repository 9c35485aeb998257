"""Splice, ablate, steer and record with an SAE inside the real SmolLM2."""

import pytest
import torch

import sae
from sae.hooks import ablate, record, splice, steer

HOOK = "blocks.6.hook_resid_post"


@pytest.fixture(scope="module")
def ids(smollm2):
    _, tok = smollm2
    text = (
        "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him."
    )
    return torch.tensor([[tok.bos_token_id] + tok(text).input_ids])


@pytest.fixture(scope="module")
def clean(smollm2, ids):
    with torch.no_grad():
        return smollm2[0](ids).logits


@pytest.fixture(scope="module")
def topk_sae(smollm2, ids):
    """A TopK SAE whose b_dec sits at the data mean, so its codes are not degenerate."""
    torch.manual_seed(0)
    d = sae.create("topk", d_in=576, d_sae=2304, k=32, hook_name=HOOK)
    with torch.no_grad(), record(smollm2[0], [HOOK]) as acts:
        smollm2[0](ids)
    with torch.no_grad():
        d.b_dec.copy_(acts[HOOK][0, 1:].mean(0))
    return d


@torch.no_grad()
def test_splice_with_error_term_gives_clean_logits(smollm2, ids, clean, topk_sae):
    with splice(smollm2[0], topk_sae, error_term=True):
        logits = smollm2[0](ids).logits
    torch.testing.assert_close(logits, clean, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_splice_without_error_term_changes_logits(smollm2, ids, clean, topk_sae):
    with splice(smollm2[0], topk_sae), record(smollm2[0], [HOOK]) as acts:
        logits = smollm2[0](ids).logits
    assert (logits - clean).abs().max() > 1.0
    # what the model saw at the hook is the SAE's reconstruction, except at BOS
    with record(smollm2[0], [HOOK]) as clean_acts:
        smollm2[0](ids)
    torch.testing.assert_close(acts[HOOK][:, 1:], topk_sae(clean_acts[HOOK][:, 1:]))
    torch.testing.assert_close(acts[HOOK][:, :1], clean_acts[HOOK][:, :1])


@torch.no_grad()
def test_hooks_are_removed_on_exit_even_after_errors(smollm2, ids, clean, topk_sae):
    with pytest.raises(RuntimeError), splice(smollm2[0], topk_sae):
        raise RuntimeError("boom")
    torch.testing.assert_close(smollm2[0](ids).logits, clean)


@torch.no_grad()
def test_ablating_inactive_latents_changes_nothing_and_active_ones_do(
    smollm2, ids, clean, topk_sae
):
    with record(smollm2[0], [HOOK]) as acts:
        smollm2[0](ids)
    z = topk_sae.encode(acts[HOOK][:, 1:])
    active = z.flatten(0, 1).ne(0).any(0)
    inactive = torch.nonzero(~active).flatten()[:50].tolist()
    with ablate(smollm2[0], topk_sae, inactive):
        torch.testing.assert_close(smollm2[0](ids).logits, clean, atol=1e-4, rtol=1e-4)
    with ablate(smollm2[0], topk_sae, torch.nonzero(active).flatten().tolist()):
        assert (smollm2[0](ids).logits - clean).abs().max() > 0.1


@torch.no_grad()
def test_steering_raises_the_latent_downstream(smollm2, ids, topk_sae):
    model = smollm2[0]
    downstream = "blocks.7.hook_resid_pre"  # the next block's input: after the edit at block 6
    with record(model, [downstream]) as acts:
        model(ids)
    before = topk_sae.pre_acts(acts[downstream][:, 1:])
    latent = int(before.mean((0, 1)).argmin())  # the least active latent
    with (
        steer(model, topk_sae, latent, scale=40.0),
        record(model, [downstream, "blocks.12.hook_resid_post"]) as steered,
    ):
        model(ids)
    after = topk_sae.pre_acts(steered[downstream][:, 1:])
    torch.testing.assert_close(
        after[..., latent] - before[..., latent],
        torch.full_like(before[..., latent], 40.0),
        atol=1e-3,
        rtol=1e-4,
    )
    assert (topk_sae.encode(steered[downstream][:, 1:])[..., latent] > 0).all(), (
        "steered latent should fire everywhere"
    )
    # and its direction persists further down the residual stream
    direction = topk_sae.W_dec[latent]
    with record(model, ["blocks.12.hook_resid_post"]) as plain:
        model(ids)
    gain = (
        steered["blocks.12.hook_resid_post"][0, 1:] - plain["blocks.12.hook_resid_post"][0, 1:]
    ) @ direction
    assert (gain > 0.2 * 40).all(), "at least a fifth of the push should survive six blocks"


@torch.no_grad()
def test_splice_into_bf16_model_with_fp32_sae(smollm2, ids, topk_sae):
    model = smollm2[0]
    with torch.autocast("cpu", dtype=torch.bfloat16), splice(model, topk_sae, error_term=True):
        logits = model(ids).logits
    assert logits.isfinite().all()
