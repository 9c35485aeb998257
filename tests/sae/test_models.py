"""Each architecture's math against a hand-written computation on small tensors."""

import pytest
import torch

import sae
from sae.kernels import batch_topk_selection, topk_selection
from sae.models import TrainContext, auxk_activation, dense_code, topk_activation
from tests.conftest import TopkSizes, make_sae


def hand_pre(d, x):
    """pre[n, j] = sum_i (x[n, i] - b_dec[i]) * W_enc[i, j] + b_enc[j], spelled out with loops."""
    n_rows, d_in = x.shape
    pre = torch.zeros(n_rows, d.cfg.d_sae)
    for n in range(n_rows):
        for j in range(d.cfg.d_sae):
            pre[n, j] = (
                sum((x[n, i] - d.b_dec[i]) * d.W_enc[i, j] for i in range(d_in)) + d.b_enc[j]
            )
    return pre


def hand_decode(d, z):
    return torch.stack(
        [sum(z[n, j] * d.W_dec[j] for j in range(d.cfg.d_sae)) + d.b_dec for n in range(z.shape[0])]
    )


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(5, 6)


@torch.no_grad()
def test_standard_is_relu_of_affine(x):
    d = make_sae("standard")
    pre = hand_pre(d, x)
    z = torch.where(pre > 0, pre, torch.zeros_like(pre))
    torch.testing.assert_close(d.encode(x), z)
    torch.testing.assert_close(d.decode(z), hand_decode(d, z))
    torch.testing.assert_close(d(x), hand_decode(d, z))


@torch.no_grad()
def test_topk_keeps_k_largest_per_row(x):
    d = make_sae("topk", k=3)
    pre = hand_pre(d, x)
    z = torch.zeros_like(pre)
    for n in range(pre.shape[0]):
        for j in sorted(range(pre.shape[1]), key=lambda j: -pre[n, j])[:3]:
            z[n, j] = max(pre[n, j], 0.0)
    torch.testing.assert_close(d.encode(x), z)
    assert (d.encode(x) != 0).sum(-1).le(3).all()
    torch.testing.assert_close(d(x), hand_decode(d, z))


@torch.no_grad()
def test_jumprelu_zeroes_below_threshold(x):
    d = make_sae("jumprelu")
    pre = hand_pre(d, x)
    z = torch.tensor(
        [
            [
                p if p > t and p > 0 else 0.0
                for p, t in zip(row.tolist(), d.threshold.tolist(), strict=False)
            ]
            for row in pre
        ]
    )
    torch.testing.assert_close(d.encode(x), z)
    assert 0 < (z != 0).sum() < (pre > 0).sum(), (
        "thresholds should remove some positive pre-activations"
    )


@torch.no_grad()
def test_batchtopk_training_keeps_k_per_row_on_average(x):
    d = make_sae("batchtopk", k=2)
    pre = hand_pre(d, x)
    relu = pre.clamp_min(0)
    cutoff = sorted(relu.flatten().tolist(), reverse=True)[2 * x.shape[0] - 1]
    expected = torch.where(relu >= cutoff, relu, torch.zeros_like(relu))
    z = d.train_activate(x, d.pre_acts(x), TrainContext())
    torch.testing.assert_close(z, expected)
    assert (z != 0).sum() == 2 * x.shape[0]
    assert (z != 0).sum(-1).tolist() != [2] * x.shape[0], (
        "rows should get different numbers of latents"
    )


@torch.no_grad()
def test_batchtopk_inference_is_a_shared_jumprelu_threshold(x):
    d = make_sae("batchtopk", k=2)
    pre = hand_pre(d, x)
    expected = torch.where(pre > 0.15, pre, torch.zeros_like(pre))
    torch.testing.assert_close(d.encode(x), expected)
    one_row = d.encode(x[:1])
    (
        torch.testing.assert_close(one_row, d.encode(x)[:1]),
        "inference codes must not depend on the batch",
    )


@torch.no_grad()
def test_matryoshka_prefixes_reconstruct_from_leading_latents(x):
    d = make_sae("matryoshka_batchtopk", d_sae=16, matryoshka_widths=[2, 6, 16])
    z = d.encode(x)
    decodes = d.prefix_decodes(z)
    assert len(decodes) == 3
    for width, x_hat in zip([2, 6, 16], decodes, strict=False):
        masked = z.clone()
        masked[:, width:] = 0
        torch.testing.assert_close(x_hat, hand_decode(d, masked))
    torch.testing.assert_close(decodes[-1], d(x))


def test_matryoshka_default_widths_double_up_to_d_sae():
    assert make_sae("matryoshka_batchtopk", d_sae=64).widths == [8, 16, 32, 64]


@torch.no_grad()
def test_gated_gate_and_magnitude_paths(x):
    d = make_sae("gated")
    x_in = x - d.b_dec
    z = torch.zeros(x.shape[0], d.cfg.d_sae)
    for n in range(x.shape[0]):
        for j in range(d.cfg.d_sae):
            gate = sum(x_in[n, i] * d.W_enc[i, j] for i in range(6)) + d.b_gate[j]
            mag = (
                sum(x_in[n, i] * d.W_enc[i, j] * torch.exp(d.r_mag[j]) for i in range(6))
                + d.b_mag[j]
            )
            z[n, j] = max(mag, 0.0) if gate > 0 else 0.0
    torch.testing.assert_close(d.encode(x), z)
    assert "b_enc" not in d.state_dict()


@torch.no_grad()
def test_b_dec_not_subtracted_when_disabled(x):
    d = make_sae("standard", apply_b_dec_to_input=False)
    torch.testing.assert_close(d.pre_acts(x), x @ d.W_enc + d.b_enc)


@pytest.mark.parametrize("architecture", sae.ARCHITECTURES)
@torch.no_grad()
def test_input_normalization_folds_into_weights(architecture, x):
    """With inputs scaled by s inside the SAE, the folded weights (s = 1) give the same outputs."""
    d = make_sae(
        architecture, normalize_activations="expected_average_only_in", norm_scaling_factor=3.7
    )
    plain = make_sae(architecture)
    plain.load_state_dict(d.folded_state_dict())
    torch.testing.assert_close(plain.encode(x), d.encode(x))
    torch.testing.assert_close(plain(x), d(x))
    # and the scale is really applied: the SAE sees 3.7 x
    torch.testing.assert_close(d.pre_acts(x / 3.7), make_sae(architecture).pre_acts(x))


@pytest.mark.parametrize("architecture", sae.ARCHITECTURES)
def test_decoder_initialised_unit_norm_and_encoder_as_transpose(architecture):
    d = sae.create(architecture, d_in=8, d_sae=32, k=4)
    torch.testing.assert_close(d.W_dec.norm(dim=1), torch.ones(32))
    torch.testing.assert_close(d.W_enc, d.W_dec.T)


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "gated"])
@torch.no_grad()
def test_fold_decoder_norm_keeps_outputs(architecture, x):
    d = make_sae(architecture)
    before_x_hat = d(x)
    d.fold_decoder_norm_()
    torch.testing.assert_close(d.W_dec.norm(dim=1), torch.ones(16))
    torch.testing.assert_close(d(x), before_x_hat)


def test_fold_decoder_norm_refused_for_topk():
    with pytest.raises(ValueError, match="cannot fold decoder norms"):
        make_sae("topk").fold_decoder_norm_()


def test_normalize_decoder_sets_unit_rows():
    d = make_sae("topk")
    d.normalize_decoder_()
    torch.testing.assert_close(d.W_dec.norm(dim=1), torch.ones(16))


def test_the_dense_code_of_a_selection_keeps_the_k_largest_relu_d():
    """TopK's per row, BatchTopK's over the batch (a row may keep more or fewer than k)."""
    pre = torch.randn(6, 10)
    pre[0] = -1.0  # nothing positive: the row's selected entries ReLU to 0
    z = dense_code(pre, topk_selection(3))
    torch.testing.assert_close(z, topk_activation(pre, 3))
    z = dense_code(pre, batch_topk_selection(3))
    kept = pre.flatten().topk(18).values.relu()
    assert sorted(z[z > 0].tolist()) == sorted(kept[kept > 0].tolist())


@pytest.mark.parametrize("shift", [-1.5, 0.0])  # few positives per row (the ReLU), many (topk)
def test_auxk_activation_is_the_relu_d_top_k_with_its_gradient(shift):
    k = 12
    pre = (torch.randn(64, 40) + shift).requires_grad_()
    assert ((pre > 0).sum(-1).max() <= k) == (shift < 0)
    weights = torch.randn(64, 40)
    with TopkSizes() as spy:
        got = auxk_activation(pre, k)
    assert bool(spy.sizes) == (shift == 0)  # few positives: the ReLU, no topk
    (got * weights).sum().backward()
    grad, pre.grad = pre.grad, None
    want = topk_activation(pre, k)
    (want * weights).sum().backward()
    assert torch.equal(got, want) and torch.equal(grad, pre.grad)


def test_wrong_d_in_is_refused_naming_the_hook():
    d = sae.create("topk", d_in=6, d_sae=16, k=3, hook_name="blocks.3.hook_resid_post")
    with pytest.raises(ValueError, match=r"blocks\.3\.hook_resid_post.*d_in=6.*\(2, 7\)"):
        d.encode(torch.randn(2, 7))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"architecture": "relu2"}, "unknown architecture 'relu2'"),
        ({"k": 40, "d_sae": 16}, "k=40 is larger than d_sae=16"),
        ({"d_in": 0}, "d_in must be a positive integer"),
        ({"dtype": "float8"}, "dtype 'float8'"),
        (
            {
                "architecture": "matryoshka_batchtopk",
                "d_sae": 16,
                "k": 4,
                "matryoshka_widths": [4, 8],
            },
            "end at d_sae=16",
        ),
        ({"normalize_activations": "layer_norm"}, "normalize_activations"),
    ],
)
def test_invalid_config_is_refused(fields, message):
    with pytest.raises(sae.ConfigError, match=message):
        sae.SAEConfig(**fields)


def test_encode_handles_batch_and_sequence_dims():
    d = make_sae("topk")
    x = torch.randn(2, 5, 6)
    assert d.encode(x).shape == (2, 5, 16)
    torch.testing.assert_close(d(x)[1], d(x[1]))


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "gated"])
def test_b_dec_s_gradient_through_the_encoder_forms_no_input_gradient(architecture):
    """The encoder's centring by b_dec gives the gradients of (x - b_dec) @ W_enc + b_enc spelled
    out, yet backward forms no [batch, d_in] tensor (the input's gradient, which autograd built
    for b_dec's sake: a matmul as large as the encoder's)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    d = make_sae(architecture, d_in=6, d_sae=16)
    x = torch.randn(40, 6)
    params = dict(d.named_parameters())
    pre = d.pre_acts(x)
    want = (x - d.b_dec) @ d.W_enc + (d.b_gate if architecture == "gated" else d.b_enc)
    torch.testing.assert_close(pre, want)
    g = torch.randn_like(pre)
    expected = torch.autograd.grad(want, list(params.values()), g, allow_unused=True)

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shapes.extend(tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out)
                          if isinstance(t, torch.Tensor))  # fmt: skip
            return out

    shapes = []
    pre = d.pre_acts(x)
    with Shapes():
        got = torch.autograd.grad(pre, list(params.values()), g, allow_unused=True)
    assert (16,) in shapes or (6, 16) in shapes  # backward seen
    assert (40, 6) not in shapes
    for name, a, b in zip(params, got, expected, strict=True):
        if b is None:
            assert a is None or not a.any(), name
        else:
            torch.testing.assert_close(a, b, msg=name)
