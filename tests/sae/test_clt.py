"""Cross-layer transcoders: a one-layer CLT is a transcoder, layer j's output depends on the inputs
of layers <= j only, the sparse decode equals the dense one, the scales and the input centre fold
into saved files, and what cannot be a CLT is refused by name."""

import warnings

import pytest
import torch
from safetensors.torch import load_file

import sae
from sae import kernels
from sae.clt import COEFFICIENTS, RULES, CLTConfig, CrossLayerTranscoder
from sae.config import ConfigError
from sae.models import StandardSAE, TrainContext
from tests.conftest import make_sae
from train.trainer import start_decoder

D, F = 6, 16


def hooks(layers, kind="mlp.hook_in"):
    return [f"blocks.{i}.{kind}" for i in layers]


def make_clt(architecture="jumprelu", layers=(0, 1, 2), seed=0, centred=False, **fields):
    """A CLT with every parameter random (thresholds small and positive), and its input centre
    too when `centred`."""
    torch.manual_seed(seed)
    cfg = CLTConfig(architecture=architecture, hook_names=hooks(layers),
                    hook_names_out=hooks(layers, "hook_mlp_out"), d_in=D, d_sae=F, k=3, **fields)  # fmt: skip
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        for name, tensor in clt.state_dict().items():
            if name.endswith("threshold"):
                tensor.copy_(torch.rand_like(tensor) * 0.3)
            elif not name.endswith("input_centre") or centred:
                tensor.copy_(torch.randn_like(tensor) * 0.5)
    return clt


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("architecture", RULES)
def test_a_one_layer_clt_is_a_transcoder(architecture):
    """Same weights, same codes, outputs, loss terms and gradients as sae.models' transcoder."""
    clt = make_clt(architecture, layers=[4])
    t = make_sae(architecture, d_in=D, d_sae=F, k=3, hook_name="blocks.4.mlp.hook_in",
                 hook_name_out="blocks.4.hook_mlp_out", apply_b_dec_to_input=False)  # fmt: skip
    state = {k.removeprefix("layers.0."): v for k, v in clt.state_dict().items()
             if k.startswith("layers.0.")}  # fmt: skip
    t.load_state_dict({**state, "b_dec": clt.b_dec.detach()})
    x, y = torch.randn(64, D) * 2, torch.randn(64, D)
    torch.testing.assert_close(clt.encode(x), t.encode(x))
    torch.testing.assert_close(clt(x), t(x))
    ctx = TrainContext(sparsity_coefficient=0.3, aux_coefficient=0.5, dead=torch.rand(F) < 0.5)
    ours = clt.training_loss(x, ctx, y)
    theirs = sae.SAE.training_loss(t, x, ctx, y)  # the dense reference
    assert set(ours.parts) == set(theirs.parts)
    for name in ours.parts:
        torch.testing.assert_close(ours.parts[name], theirs.parts[name], atol=1e-5, rtol=1e-5)
    ours.loss.backward()
    theirs.loss.backward()
    mine = grads(clt)
    for name, g in grads(t).items():
        torch.testing.assert_close(mine["b_dec" if name == "b_dec" else f"layers.0.{name}"], g,
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
    assert torch.equal(ours.fired, theirs.fired) and ours.l0 == theirs.l0


@pytest.mark.parametrize("architecture", ["jumprelu", "topk"])
def test_each_output_reads_only_the_layers_up_to_its_own(architecture):
    clt = make_clt(architecture, layers=[0, 1, 2, 3])
    x = torch.randn(32, 4 * D) * 2
    y = clt(x).unflatten(-1, (4, D))
    later = x.clone()
    later[:, 2 * D :] += torch.randn(32, 2 * D) * 3  # layers 2 and 3 only
    changed = clt(later).unflatten(-1, (4, D))
    torch.testing.assert_close(changed[:, :2], y[:, :2])
    assert not torch.allclose(changed[:, 2:], y[:, 2:])
    # layer 0's latents reach every later output: that is what a per-layer transcoder cannot do
    z = clt.encode(x).unflatten(-1, (4, F))
    only_layer_0 = torch.cat([z[:, 0], torch.zeros(32, 3 * F)], -1)
    reach = clt.decode(only_layer_0).unflatten(-1, (4, D)) - clt.b_dec.view(4, D)
    assert all(reach[:, j].abs().sum() > 0 for j in range(4))


@pytest.mark.parametrize("architecture", RULES)
def test_the_sparse_decode_equals_the_dense_one(architecture, monkeypatch):
    """Every layer decodes its code's support alone (JumpReLU's zeros near its thresholds too),
    with the dense decode's loss terms and gradients."""
    clt = make_clt(architecture)
    x, y = torch.randn(128, 3 * D), torch.randn(128, 3 * D)
    ctx = TrainContext(sparsity_coefficient=0.3, aux_coefficient=0.5, bandwidth=0.5,
                       dead=torch.rand(3 * F) < 0.3)  # fmt: skip
    monkeypatch.setattr(kernels, "SPARSE_SHARE", 1.0)  # these small codes are dense
    sparse = clt.training_loss(x, ctx, y)
    sparse.loss.backward()
    sparse_grads = grads(clt)
    clt.zero_grad()
    monkeypatch.setattr(kernels, "SPARSE_SHARE", -1.0)
    dense = clt.training_loss(x, ctx, y)
    dense.loss.backward()
    for name in dense.parts:
        torch.testing.assert_close(sparse.parts[name], dense.parts[name], atol=1e-5, rtol=1e-5)
    for name, g in grads(clt).items():
        torch.testing.assert_close(sparse_grads[name], g, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_a_cuda_step_waits_for_the_device_twice_a_layer_at_most():
    """On a GPU each layer's sparse decode takes the batch at once: one nonzero() a layer waits
    for the device, and AuxK's dead index another. Chunked as on the CPU, this CLT's step would
    wait 25 times (SmolLM2's 30 layers: a thousand, 0.97 s a step on an H200)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    n, d = 4, 576
    cfg = CLTConfig(architecture="topk", hook_names=hooks(range(n)), d_in=d, d_sae=1024, k=16,
                    hook_names_out=hooks(range(n), "hook_mlp_out"), device="cuda")  # fmt: skip
    clt = CrossLayerTranscoder(cfg)
    x, y = torch.randn(4096, n * d, device="cuda"), torch.randn(4096, n * d, device="cuda")
    ctx = TrainContext(dead=torch.rand(n * 1024, device="cuda") < 0.1)
    clt.training_loss(x, ctx, y).loss.backward()  # Triton compiles, the allocator warms up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            clt.training_loss(x, ctx, y).loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
    assert len(syncs) <= 2 * n, syncs


def test_the_loss_is_the_joint_mse_of_every_output():
    """By hand: y_hat_j = sum_{i<=j} z_i @ W_dec_i[:, block j] + b_dec_j, MSE over all outputs."""
    clt = make_clt("standard")
    x, y = torch.randn(16, 3 * D), torch.randn(16, 3 * D)
    z = [clt.layers[i].encode(x[:, i * D : (i + 1) * D]) for i in range(3)]
    y_hat = torch.cat([
        sum(z[i] @ clt.layers[i].W_dec[:, (j - i) * D : (j - i + 1) * D] for i in range(j + 1))
        + clt.b_dec[j * D : (j + 1) * D]
        for j in range(3)
    ], -1)  # fmt: skip
    out = clt.training_loss(x, TrainContext(sparsity_coefficient=0.0), y)
    torch.testing.assert_close(out.parts["mse_loss"], (y_hat - y).pow(2).sum(-1).mean())
    torch.testing.assert_close(out.x_hat, y_hat)


@torch.no_grad()
@pytest.mark.parametrize("architecture", RULES)
def test_saved_files_fold_the_scales_and_the_input_centre_and_load_back(tmp_path, architecture):
    """The file has no field for the input centre: each layer's encoder biases take it (Gated's
    gate and magnitude biases both), so the loaded CLT, centred at zero, codes as the trained one."""
    clt = make_clt(architecture, centred=True, normalize_activations="expected_average_only_in",
                   norm_scaling_factors=[0.5, 2.0, 1.5], norm_scaling_factors_out=[3.0, 0.7, 1.1])  # fmt: skip
    x = torch.randn(20, 3 * D) + 1
    clt.save(tmp_path / "clt")
    saved = load_file(tmp_path / "clt" / "sae_weights.safetensors")
    assert not any("centre" in name for name in saved)
    back = sae.load(tmp_path / "clt")
    assert isinstance(back, CrossLayerTranscoder) and back.cfg.normalize_activations == "none"
    assert not any(part.input_centre.any() for part in back.layers)
    assert (clt.encode(x) > 0).any() and (clt.encode(x) == 0).any()
    torch.testing.assert_close(back(x), clt(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back.encode(x), clt.encode(x), atol=1e-5, rtol=1e-5)
    layer_1 = x[:, D : 2 * D]
    torch.testing.assert_close(back.encode_layer(1, layer_1), clt.encode_layer(1, layer_1))
    assert back.cfg.hook_names == clt.cfg.hook_names


def test_what_is_not_a_clt_is_refused(tmp_path):
    cases = [
        ({"hook_names": ["blocks.0.mlp.hook_in", "blocks.1.hook_resid_mid"]}, "reads one hookpoint kind"),
        ({"hook_names": hooks([1, 0]), "hook_names_out": hooks([1, 0], "hook_mlp_out")}, "must increase"),
        ({"hook_names_out": hooks([0, 2], "hook_mlp_out")}, "at the same layers"),
        ({"hook_names": ["mlp.0", "mlp.1"]}, r"are blocks\.L\.<kind>"),
        ({"architecture": "matryoshka_batchtopk"}, "layers use one of"),
        ({"hook_names_out": hooks([0], "hook_mlp_out")}, "one input and one output hookpoint per layer"),
    ]  # fmt: skip
    for fields, message in cases:
        cfg = {
            "hook_names": hooks([0, 1]),
            "hook_names_out": hooks([0, 1], "hook_mlp_out"),
            **fields,
        }
        with pytest.raises(ConfigError, match=message):
            CLTConfig(**cfg)
    clt = make_clt()
    with pytest.raises(ValueError, match=r"last dimension 3 \* 6 = 18; got \(4, 6\)"):
        clt(torch.randn(4, D))
    clt.save(tmp_path / "clt")
    weights = tmp_path / "clt" / "sae_weights.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    state["layers.1.W_enc"] = state["layers.1.W_enc"][:, :5].contiguous()
    save_file(state, weights)
    with pytest.raises(
        sae.FormatError, match="do not fit the cross_layer_transcoder its cfg.json describes"
    ):
        sae.load(tmp_path / "clt")


def test_a_clt_starts_random_under_auto_and_from_zero_when_asked():
    """decoder_init auto zeroes only transcoders at one hookpoint: a BatchTopK CLT over 30 SmolLM2
    layers recovered 0.704 of the CE loss from zero against 0.822 from random rows, and a JumpReLU
    CLT's latents died from zero as from random rows; `zero` zeroes every layer's."""
    clt = make_clt("topk")
    start_decoder(clt, "auto", rate=1.0)
    assert all(bool(part.W_dec.abs().sum() > 0) for part in clt.parts)
    start_decoder(clt, "zero", rate=1.0)
    assert all(bool((part.W_dec == 0).all()) for part in clt.parts)


@pytest.mark.parametrize(
    ("architecture", "transcoder", "own"), [("topk", True, 3.0), ("batchtopk", False, 1.4)]
)
def test_a_clt_trains_at_the_rule_s_rate_without_its_factors(architecture, transcoder, own):
    """The TopK transcoder's and BatchTopK SAE's own factors (decisions 78, 67) were swept at
    one hookpoint only."""
    clt = make_clt(architecture)
    assert clt.parts[0].rate_factor(transcoder, clt.cfg.d_sae) == own
    assert clt.rate_factor(clt.cfg.is_transcoder, clt.cfg.d_sae) == 1.0


def test_a_jumprelu_clt_takes_the_weight_measured_for_clts_and_other_rules_their_sae_weight():
    """At its SAE weight a JumpReLU CLT over 30 SmolLM2 layers recovered 0.687 of the CE loss, at
    0.3 0.719 (bench/clt.py --coefficients); ReLU-L1's CLT weight was not measured."""
    assert make_clt("jumprelu").default_coefficient(78, F, True) == COEFFICIENTS["jumprelu"] == 0.3
    assert make_clt("standard").default_coefficient(354, F, True) == pytest.approx(
        StandardSAE.default_coefficient(354, F)
    )
