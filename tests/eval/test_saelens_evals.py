"""Cross-check against SAELens's `run_evals` on the same SAE and the same token windows.

The small TopK SAE on SmolLM2's layer-6 residual stream shared by the eval tests (conftest) is
saved in our (SAELens) format, loaded with `sae_lens.SAE.load_from_disk`, and scored by SAELens on
SmolLM2 booted offline from the local folder through `TransformerBridge.boot_transformers`, on the
held-out windows of the same conftest. Our numbers come from eval.splice / eval.reconstruction /
eval.sparsity on the transformers model. Where the two libraries define a metric alike they must
agree; where they differ (docs/eval.md, "Cross-check with SAELens run_evals") SAELens's definition
is recomputed from our activations and logits, so every difference is explained, not just observed.
"""

import math

import pytest
import torch
from torch.nn import functional as F

from eval.reconstruction import reconstruction
from eval.saelens_evals import WindowStore, run_evals_config
from eval.sparsity import SparsityStats
from eval.splice import spliced_losses
from sae.hooks import edit, record, splice
from sae.lm import smollm2_dir

HOOK = "blocks.6.hook_resid_post"
BATCH = 4  # windows per run_evals batch


@pytest.fixture(scope="module")
def saelens_metrics(trained_sae, heldout_ids, tmp_path_factory):
    """run_evals under both of SAELens's token conventions: its default, which masks special
    tokens (here: BOS at position 0 only), and exclude_special_tokens=False (position 0 scored and
    spliced). Flattened to {metric: value}."""
    import sae_lens
    from sae_lens.evals import run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from transformer_lens.model_bridge import TransformerBridge

    path = tmp_path_factory.mktemp("saelens_evals") / "sae"
    trained_sae.save(str(path))
    sl_sae = sae_lens.SAE.load_from_disk(path)
    bridge = TransformerBridge.boot_transformers(str(smollm2_dir()), device="cpu")
    # The bridge resolves our TransformerLens-style name to its own hook, so no renaming is needed.
    assert sl_sae.cfg.metadata.hook_name == HOOK
    assert bridge.hook_dict[HOOK] is bridge.hook_dict["blocks.6.hook_out"]
    config = run_evals_config(len(heldout_ids), BATCH)
    out = {}
    for convention, exclude in (("no_bos", True), ("bos", False)):
        metrics, _ = run_evals(
            sl_sae,
            WindowStore(heldout_ids, BATCH),
            bridge,
            ActivationScaler(),
            config,
            exclude_special_tokens=exclude,
        )
        out[convention] = {k: v for group in metrics.values() for k, v in group.items()}
    out["special_tokens"] = sorted(sae_lens.util.get_special_token_ids(bridge.tokenizer))
    return out


def _ce(logits, ids, first):
    """Mean next-token CE of the predictions made from positions first..n-2."""
    return F.cross_entropy(logits[:, first:-1].flatten(0, 1), ids[:, first + 1 :].flatten()).item()


def _kl(clean, other, first):
    """SAELens's KL: KL(clean || other) per position first..n-1, the last position included
    (it predicts a token outside the window), averaged over positions."""
    p, q = clean[:, first:].log_softmax(-1), other[:, first:].log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.fixture(scope="module")
def ours(smollm2, trained_sae, heldout_ids):
    """Our metrics on the same windows, plus the raw logits and activations from which SAELens's
    other definitions are recomputed."""
    model, d = smollm2[0], trained_sae
    assert d.cfg.hook_name == HOOK
    with torch.no_grad():
        losses = spliced_losses(model, d, heldout_ids.split(BATCH))
        with record(model, [HOOK]) as acts:
            clean = model(heldout_ids).logits
        with splice(model, d):
            sae_logits = model(heldout_ids).logits
        with splice(model, d, skip_first=False):
            sae_logits_bos = model(heldout_ids).logits
        with edit(model, HOOK, torch.zeros_like):  # SAELens's ablation: every position zeroed
            ablated = model(heldout_ids[:1]).logits
        x = acts[HOOK]
        z = d.encode(x)
        x_hat = d.decode(z)

    def recon_and_l0(first):
        sparsity = SparsityStats(d.cfg.d_sae)
        sparsity.add(z[:, first:])
        return {
            **reconstruction(d, [x[:, first:].flatten(0, 1)]),
            "l0": sparsity.result()["l0"],
            "l1": z[:, first:].abs().sum(-1).mean().item(),  # not a report key: checks the codes
        }

    return {
        **losses,
        **recon_and_l0(1),
        "with_bos": recon_and_l0(0),
        "logits": {"clean": clean, "sae": sae_logits, "sae_bos": sae_logits_bos},
        "ablated": ablated,
        "x": x,
        "x_hat": x_hat,
    }


def test_windows_hold_no_special_token_but_the_leading_bos(saelens_metrics, heldout_ids):
    """SAELens's default masks tokens by id (BOS, EOS/PAD), ours by position (0). On these windows
    the two select the same tokens, which is what makes the comparisons below like-for-like."""
    assert saelens_metrics["special_tokens"] == [1, 2]
    assert (heldout_ids[:, 0] == 1).all()
    assert not torch.isin(heldout_ids[:, 1:], torch.tensor([1, 2])).any()


def test_ce_clean_and_with_sae_agree(saelens_metrics, ours, heldout_ids):
    """Both score predictions from positions 1..n-2 and splice the SAE at positions 1.. only."""
    sl = saelens_metrics["no_bos"]
    assert sl["ce_loss_without_sae"] == pytest.approx(ours["ce_clean"], rel=1e-4)
    assert sl["ce_loss_with_sae"] == pytest.approx(ours["ce_sae"], rel=1e-4)
    assert ours["tokens"] == heldout_ids.shape[0] * (heldout_ids.shape[1] - 2)


def test_zero_ablation_differs_because_saelens_also_zeroes_bos(
    smollm2, saelens_metrics, ours, heldout_ids
):
    """SAELens zero-ablates every position, the attention sink too. With nothing to attend to,
    every later layer adds exactly zero, the final RMSNorm of 0 is 0, and the logits are all 0:
    CE is ln(vocab) whatever the text. We keep position 0, so later layers still read BOS and
    the model turns confidently wrong: our ablated CE is above ln(vocab), the denominator of CE
    loss recovered is larger, and so is our score. Recomputing SAELens's score from our clean
    and spliced CE with CE_zero = ln(vocab) gives its number."""
    assert (ours["ablated"] == 0).all()
    ln_vocab = math.log(smollm2[0].config.vocab_size)
    sl = saelens_metrics["no_bos"]
    assert sl["ce_loss_with_ablation"] == pytest.approx(ln_vocab, rel=1e-6)
    assert saelens_metrics["bos"]["ce_loss_with_ablation"] == pytest.approx(ln_vocab, rel=1e-6)
    assert ours["ce_zero_ablation"] > ln_vocab + 1
    saelens_score = (ln_vocab - ours["ce_sae"]) / (ln_vocab - ours["ce_clean"])
    assert sl["ce_loss_score"] == pytest.approx(saelens_score, rel=1e-4)
    assert ours["ce_loss_recovered"] > sl["ce_loss_score"] + 0.05


def test_kl_follows_saelens_definition_recomputed_from_our_logits(saelens_metrics, ours):
    """SAELens's KL includes the last position and ablates BOS too (uniform output: zero logits);
    recomputed that way from our logits it agrees. Ours scores positions 1..n-2 only."""
    sl, logits = saelens_metrics["no_bos"], ours["logits"]
    kl_sae = _kl(logits["clean"], logits["sae"], 1)
    kl_zero = _kl(logits["clean"], torch.zeros_like(logits["clean"]), 1)
    assert sl["kl_div_with_sae"] == pytest.approx(kl_sae, rel=1e-4)
    assert sl["kl_div_with_ablation"] == pytest.approx(kl_zero, rel=1e-4)
    assert sl["kl_div_score"] == pytest.approx((kl_zero - kl_sae) / kl_zero, rel=1e-4)
    assert ours["kl_sae"] == pytest.approx(
        _kl(logits["clean"][:, :-1], logits["sae"][:, :-1], 1), rel=1e-4
    )


def test_reconstruction_and_l0_agree(saelens_metrics, ours):
    """SAELens 6.54's explained_variance is centred over all tokens (E||x||^2 - ||E x||^2), as
    ours is; its mse sums over the 576 dimensions where ours averages; cosine, L2 ratio, L0 alike.
    L0 is 32 on every token for TopK, so the L1 of the codes checks that SAELens's copy of the SAE
    encodes as ours does."""
    sl = saelens_metrics["no_bos"]
    assert sl["explained_variance"] == pytest.approx(ours["explained_variance"], abs=1e-4)
    assert sl["mse"] == pytest.approx(ours["mse"] * 576, rel=1e-4)
    assert sl["cossim"] == pytest.approx(ours["cosine"], rel=1e-4)
    assert sl["l2_ratio"] == pytest.approx(ours["l2_ratio"], rel=1e-4)
    assert sl["l0"] == ours["l0"] == 32
    assert sl["l1"] == pytest.approx(ours["l1"], rel=1e-4)


def test_legacy_explained_variance_is_a_mean_of_per_token_ratios(saelens_metrics, ours):
    """SAELens's explained_variance_legacy: per token 1 - ||x - x_hat||^2 / ||x - batch mean||^2,
    averaged over tokens, with the mean taken per run_evals batch. A token near its batch mean
    weighs a lot, so it is below the pooled (centred) explained variance here."""
    x, x_hat = ours["x"][:, 1:], ours["x_hat"][:, 1:]
    per_token = []
    for xb, hb in zip(x.split(BATCH), x_hat.split(BATCH), strict=True):
        xb, hb = xb.flatten(0, 1).double(), hb.flatten(0, 1).double()
        per_token.append(1 - (xb - hb).pow(2).sum(-1) / (xb - xb.mean(0)).pow(2).sum(-1))
    legacy = torch.cat(per_token).mean().item()
    sl = saelens_metrics["no_bos"]
    assert sl["explained_variance_legacy"] == pytest.approx(legacy, abs=1e-4)
    assert legacy < ours["explained_variance"] - 0.02


def test_with_bos_included_saelens_matches_ours_recomputed_with_position_0(
    saelens_metrics, ours, heldout_ids
):
    """exclude_special_tokens=False: SAELens splices and scores position 0 as well. Our metrics
    computed over positions 0.. (SAE spliced at BOS too) reproduce it, so the gap between the two
    conventions is entirely the attention sink: splicing an SAE that never saw it into it breaks
    what every later token attends to, and CE loss recovered drops."""
    sl, logits, with_bos = saelens_metrics["bos"], ours["logits"], ours["with_bos"]
    assert sl["ce_loss_without_sae"] == pytest.approx(
        _ce(logits["clean"], heldout_ids, 0), rel=1e-4
    )
    assert sl["ce_loss_with_sae"] == pytest.approx(_ce(logits["sae_bos"], heldout_ids, 0), rel=1e-4)
    assert sl["explained_variance"] == pytest.approx(with_bos["explained_variance"], abs=1e-4)
    assert sl["mse"] == pytest.approx(with_bos["mse"] * 576, rel=1e-4)
    assert sl["l0"] == with_bos["l0"]
    assert sl["ce_loss_score"] < saelens_metrics["no_bos"]["ce_loss_score"] - 0.05
