"""The training losses of each architecture against hand computations and autograd checks."""

import pytest
import torch

from sae.models import JumpReLUSTE, StepSTE, TrainContext, firing
from tests.conftest import make_sae


def test_standard_l1_is_weighted_by_decoder_norms():
    d = make_sae("standard")
    x = torch.randn(5, 6)
    out = d.training_loss(x, TrainContext(sparsity_coefficient=2.0))
    z = d.encode(x)
    torch.testing.assert_close(out.parts["mse_loss"], (d(x) - x).pow(2).sum(-1).mean())
    torch.testing.assert_close(out.parts["l1_loss"], 2.0 * (z * d.W_dec.norm(dim=1)).sum(-1).mean())
    torch.testing.assert_close(out.loss, out.parts["mse_loss"] + out.parts["l1_loss"])


def test_losses_are_in_normalized_units():
    d = make_sae("topk", normalize_activations="expected_average_only_in", norm_scaling_factor=2.0)
    x = torch.randn(5, 6)
    out = d.training_loss(x, TrainContext())
    torch.testing.assert_close(out.parts["mse_loss"], (2 * d(x) - 2 * x).pow(2).sum(-1).mean())
    torch.testing.assert_close(out.x_hat, d(x))


def test_auxk_uses_top_dead_latents_on_the_residual():
    d = make_sae("topk", d_in=6, d_sae=16, k=2)
    x = torch.randn(5, 6)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[1, 4, 7, 9, 12]] = True
    out = d.training_loss(x, TrainContext(aux_coefficient=0.5, dead=dead))
    pre = d.pre_acts(x)
    k_aux = 3  # d_in // 2, fewer than the 5 dead latents
    masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    vals, idx = masked.topk(k_aux, dim=-1)
    z_aux = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    residual = x - d(x)
    expected = 0.5 * 1.0 * (z_aux @ d.W_dec - residual).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.parts["auxiliary_reconstruction_loss"], expected)
    assert (
        d.training_loss(x, TrainContext(dead=torch.zeros(16, dtype=torch.bool))).parts[
            "auxiliary_reconstruction_loss"
        ]
        == 0
    )


def test_jumprelu_threshold_gradient_is_the_rectangle_estimator():
    pre = torch.tensor([[0.10, 0.52, 0.31], [0.49, 0.20, 0.33]], requires_grad=True)
    threshold = torch.tensor([0.5, 0.5, 0.3], requires_grad=True)
    bandwidth = 0.1
    JumpReLUSTE.apply(pre, threshold, bandwidth).sum().backward()
    in_window = ((pre - threshold).abs() < bandwidth / 2).float()
    torch.testing.assert_close(threshold.grad, -(threshold / bandwidth * in_window).sum(0).detach())
    torch.testing.assert_close(pre.grad, (pre > threshold).float())
    threshold.grad = None
    StepSTE.apply(pre, threshold, bandwidth).sum().backward()
    torch.testing.assert_close(threshold.grad, -(in_window / bandwidth).sum(0))


def test_jumprelu_l0_penalty_counts_active_latents():
    d = make_sae("jumprelu")
    x = torch.randn(5, 6)
    out = d.training_loss(x, TrainContext(sparsity_coefficient=0.3))
    torch.testing.assert_close(out.parts["l0_loss"], 0.3 * (d.encode(x) > 0).sum(-1).float().mean())


def test_jumprelu_target_penalty_is_the_l0_s_squared_distance_from_k_and_pulls_toward_it():
    d = make_sae("jumprelu", k=3)
    x = torch.randn(64, 6)
    ctx = TrainContext(sparsity_coefficient=0.3, bandwidth=1.0, target_l0=True)
    l0 = (d.encode(x) > 0).sum(-1).float().mean()
    assert l0 > 3  # the start fires on about half the 16 latents
    out = d.training_loss(x, ctx)
    torch.testing.assert_close(out.parts["l0_loss"], 0.3 * (l0 - 3) ** 2 / 3)
    out.parts["l0_loss"].backward()
    assert (d.threshold.grad <= 0).all() and d.threshold.grad.sum() < 0  # L0 > k: thresholds rise
    d.threshold.grad = None
    with torch.no_grad():
        d.threshold.fill_(d.pre_acts(x).max() - 0.1)  # almost silent: L0 < k
    d.training_loss(x, ctx).parts["l0_loss"].backward()
    assert (d.threshold.grad >= 0).all() and d.threshold.grad.sum() > 0  # thresholds fall


def test_the_pre_activation_loss_pulls_silent_latents_up_to_their_thresholds():
    """Each latent's shortfall below its threshold times its decoder row's norm, summed over
    latents, averaged over rows: its gradient raises the pre-activations and lowers the
    thresholds of latents below them, shrinks their decoder rows, and leaves alone a latent that
    fires on every row."""
    d = make_sae("jumprelu", k=3)
    x = torch.randn(64, 6)
    with torch.no_grad():
        d.threshold.copy_(torch.linspace(0.0, 3.0, 16))
        d.threshold[0] = d.pre_acts(x)[:, 0].min() - 1  # latent 0 fires on every row
        pre = d.pre_acts(x)
    out = d.training_loss(x, TrainContext(pre_act_coefficient=0.5))
    gap = (d.threshold - pre).relu()
    by_hand = 0.5 * (gap * d.W_dec.norm(dim=-1)).sum(-1).mean()
    torch.testing.assert_close(out.parts["pre_act_loss"], by_hand)
    out.parts["pre_act_loss"].backward()
    below = (gap > 0).any(0)
    assert not below[0] and below[1:].all()
    assert d.threshold.grad[0] == 0 and (d.threshold.grad[1:] > 0).all()  # thresholds fall
    assert d.b_enc.grad[0] == 0 and (d.b_enc.grad[1:] < 0).all()  # pre-activations rise
    assert (d.W_dec.grad[1:] * d.W_dec[1:]).sum(-1).gt(0).all()  # decoder rows shrink
    assert "pre_act_loss" not in d.training_loss(x, TrainContext()).parts


def test_batchtopk_trains_on_batch_topk_and_tracks_threshold():
    d = make_sae("batchtopk", k=2)
    d.threshold.zero_()
    x = torch.randn(8, 6)
    z = d.train_activate(x, d.pre_acts(x), TrainContext())
    out = d.training_loss(x, TrainContext())  # the sparse path: no dense z, its smallest kept value
    assert out.z is None and out.smallest == z[z > 0].min()
    d.after_step(out)
    first = out.smallest.item()
    torch.testing.assert_close(d.threshold, torch.full((16,), first))  # the first step sets it
    out = d.training_loss(torch.randn(8, 6), TrainContext())
    d.after_step(out)
    second = 0.99 * first + 0.01 * out.smallest.item()
    torch.testing.assert_close(d.threshold, torch.full((16,), second))
    torch.testing.assert_close(d.W_dec.norm(dim=1), torch.ones(16))
    with torch.no_grad():
        d.b_enc.fill_(-1e4)  # nothing fires: the threshold stays
    out = d.training_loss(torch.randn(8, 6), TrainContext())
    assert out.l0 == 0 and out.smallest == float("inf") and not out.fired.any()
    d.after_step(out)
    torch.testing.assert_close(d.threshold, torch.full((16,), second))


def test_matryoshka_loss_sums_every_prefix_mse():
    d = make_sae("matryoshka_batchtopk", d_sae=16, k=3, matryoshka_widths=[4, 8, 16])
    x = torch.randn(6, 6)
    out = d.training_loss(x, TrainContext())
    z = d.train_activate(x, d.pre_acts(x), TrainContext())  # the code training kept
    mses = [(p - x).pow(2).sum(-1).mean() for p in d.prefix_decodes(z)]
    torch.testing.assert_close(out.parts["inner_mse_loss_4"], mses[0])
    torch.testing.assert_close(out.parts["inner_mse_loss_8"], mses[1])
    torch.testing.assert_close(out.parts["mse_loss"], mses[2])  # the full SAE's, as SAELens logs it
    torch.testing.assert_close(out.loss, sum(mses) + out.parts["auxiliary_reconstruction_loss"])


def test_gated_aux_loss_uses_a_frozen_decoder():
    d = make_sae("gated")
    x = torch.randn(5, 6)
    out = d.training_loss(x, TrainContext(sparsity_coefficient=1.0))
    torch.testing.assert_close(out.z, d.encode(x))
    gate = d.pre_acts(x).relu()
    torch.testing.assert_close(
        out.parts["auxiliary_reconstruction_loss"],
        (gate @ d.W_dec + d.b_dec - x).pow(2).sum(-1).mean(),
    )
    d.zero_grad()
    out.parts["auxiliary_reconstruction_loss"].backward()
    assert d.W_dec.grad is None or d.W_dec.grad.abs().sum() == 0, (
        "the aux loss must not train the decoder"
    )
    assert d.b_gate.grad.abs().sum() > 0


def test_parallel_gradient_removed():
    d = make_sae("topk")
    d.normalize_decoder_()
    d.W_dec.grad = torch.randn_like(d.W_dec)
    d.remove_parallel_grad_()
    torch.testing.assert_close((d.W_dec.grad * d.W_dec).sum(1), torch.zeros(16), atol=1e-6, rtol=0)


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "gated"])
def test_dense_rules_report_their_code_s_fired_latents_and_l0(architecture):
    """The loss's fired latents and L0 (read from float masks and column maxima, not bool ones)
    count the code's positive entries; for Gated its code is encode's, whose magnitude path
    reuses the gate's product."""
    d = make_sae(architecture, d_in=6, d_sae=16)
    with torch.no_grad():
        bias = d.b_gate if architecture == "gated" else d.b_enc
        bias.normal_()
        bias[:4] = -1e3  # these never fire
    x = torch.randn(40, 6)
    out = d.training_loss(x, TrainContext(sparsity_coefficient=0.5))
    active = out.z.detach() > 0
    assert 0 < active.float().mean() < 1
    assert torch.equal(out.fired, active.any(0)) and not out.fired[:4].any()
    torch.testing.assert_close(out.l0, active.sum(-1).float().mean())
    if architecture == "gated":
        W_mag = d.W_enc * d.r_mag.exp()
        x_in = x - d.b_dec
        want = ((x_in @ d.W_enc + d.b_gate) > 0) * (x_in @ W_mag + d.b_mag).relu()
        torch.testing.assert_close(d.encode(x), want)


def test_l0_is_counted_exactly_for_a_bfloat16_code():
    """Under --autocast a dense code is bfloat16, which holds integers exactly only up to 256."""
    z = torch.zeros(3, 2000, dtype=torch.bfloat16)
    z[:, :1001] = 0.5
    fired, l0 = firing(z)
    assert l0.item() == 1001 and fired.sum() == 1001
