"""Round trips through the real sae_lens package: ours -> SAELens and SAELens -> ours."""

import pytest
import torch

import sae
from sae.hooks import splice
from tests.conftest import make_sae

sae_lens = pytest.importorskip("sae_lens")

SAELENS_CLASSES = {
    "standard": ("StandardSAE", "StandardSAEConfig", {}),
    "topk": ("TopKSAE", "TopKSAEConfig", {"k": 3}),
    "jumprelu": ("JumpReLUSAE", "JumpReLUSAEConfig", {}),
    "gated": ("GatedSAE", "GatedSAEConfig", {}),
}


def assert_same_outputs(ours, theirs):
    """Same codes (non-trivially sparse), same decodes, same reconstructions, at atol 1e-5 in fp32."""
    x = torch.randn(32, 12) * 3
    z = ours.encode(x)
    assert (z != 0).any() and (z == 0).any()
    torch.testing.assert_close(theirs.encode(x), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.decode(z), ours.decode(z), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", sae.ARCHITECTURES)
@pytest.mark.parametrize("normalized", [False, True])
@torch.no_grad()
def test_ours_loads_in_saelens_with_same_outputs(tmp_path, architecture, normalized):
    extra = (
        {"normalize_activations": "expected_average_only_in", "norm_scaling_factor": 0.6}
        if normalized
        else {}
    )
    ours = make_sae(
        architecture, d_in=12, d_sae=40, k=4, hook_name="blocks.6.hook_resid_post", **extra
    )
    ours.save(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert theirs.cfg.metadata.hook_name == "blocks.6.hook_resid_post"
    assert_same_outputs(ours, theirs)


def saved_by_saelens(theirs, folder):
    """A SAELens dictionary with every parameter random (thresholds in [0, 0.5)), saved by SAELens."""
    torch.manual_seed(0)
    for name, p in theirs.named_parameters():
        if name == "threshold":
            p.copy_(torch.rand_like(p) * 0.5)
        else:
            p.copy_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.5))
    theirs.save_model(str(folder))
    return theirs


@pytest.mark.parametrize("architecture", list(SAELENS_CLASSES))
@torch.no_grad()
def test_saelens_saved_loads_in_ours_with_same_outputs(tmp_path, architecture):
    cls_name, cfg_name, extra = SAELENS_CLASSES[architecture]
    cfg = getattr(sae_lens, cfg_name)(d_in=12, d_sae=40, **extra)
    cfg.metadata.hook_name = "blocks.3.hook_resid_pre"
    cfg.metadata.model_name = "gpt2"
    theirs = saved_by_saelens(getattr(sae_lens, cls_name)(cfg), tmp_path)
    ours = sae.load(tmp_path)
    assert ours.cfg.architecture == architecture
    assert ours.cfg.hook_name == "blocks.3.hook_resid_pre" and ours.cfg.model_name == "gpt2"
    assert_same_outputs(ours, theirs)


@torch.no_grad()
def test_saelens_topk_training_output_loads_with_its_decoder_norm_rescale_folded(tmp_path):
    """SAELens's TopK training saves rescale_acts_by_decoder_norm=True (codes scaled by the decoder
    rows' norms before the top-k, divided by them before decoding); the map folds into our TopK."""
    cfg = sae_lens.TopKTrainingSAEConfig(d_in=12, d_sae=40, k=3)
    assert cfg.rescale_acts_by_decoder_norm
    trained = sae_lens.TopKTrainingSAE(cfg)
    torch.manual_seed(0)
    for p in trained.parameters():
        p.copy_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.5))  # rows of unequal norm
    trained.save_inference_model(str(tmp_path))
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    ours = sae.load(tmp_path)
    assert_same_outputs(ours, theirs)
    torch.testing.assert_close(ours.W_dec.norm(dim=-1), torch.ones(40))


@pytest.mark.parametrize("normalization", ["layer_norm", "constant_norm_rescale"])
def test_saelens_per_row_normalization_is_refused(tmp_path, normalization):
    """These normalize each input by its own statistics at run time, which no fixed weights
    reproduce: loading them as plain SAEs gave codes off by tens."""
    theirs = sae_lens.StandardSAE(
        sae_lens.StandardSAEConfig(d_in=12, d_sae=40, normalize_activations=normalization)
    )
    theirs.save_model(str(tmp_path))
    with pytest.raises(sae.FormatError, match=f"normalize_activations '{normalization}'"):
        sae.load(tmp_path)


def test_saelens_file_without_provenance_claims_none(tmp_path):
    """No hook_name or model_name in the file: they stay empty (not our SmolLM2 layer 6), and a
    splice without hook= says so instead of hooking some default layer."""
    sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=576, d_sae=40)).save_model(str(tmp_path))
    ours = sae.load(tmp_path)
    assert (ours.cfg.hook_name, ours.cfg.model_name, ours.cfg.dataset_path) == ("", "", "")
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=576, intermediate_size=64,
                                         num_attention_heads=2, vocab_size=10))  # fmt: skip
    with pytest.raises(ValueError, match="no hookpoint given"), splice(model, ours):
        model(torch.tensor([[1, 2]]))


@torch.no_grad()
def test_saelens_hook_z_sae_splices_as_in_transformer_lens(tmp_path, smollm2):
    """A SAELens SAE on the heads' outputs (hook_z, [batch, seq, heads, d_head] flattened to d_in =
    heads * d_head) splices into the HF model with the same logits as SAELens's SAE in place of
    hook_z inside TransformerLens."""
    from transformer_lens.model_bridge import TransformerBridge

    from tests.sae.test_lm import tiny

    model = tiny("gpt2")
    model.save_pretrained(tmp_path / "lm")
    smollm2[1].save_pretrained(tmp_path / "lm")
    cfg = sae_lens.StandardSAEConfig(d_in=32, d_sae=64)
    cfg.metadata.hook_name = "blocks.1.attn.hook_z"
    theirs = sae_lens.StandardSAE(cfg)
    torch.manual_seed(0)
    for p in theirs.parameters():
        p.copy_(torch.randn_like(p) * 0.3)
    theirs.save_model(str(tmp_path / "sae"))
    ours = sae.load(tmp_path / "sae")

    def replace(z, hook):
        return theirs(z.flatten(2)).view_as(z)

    bridge = TransformerBridge.boot_transformers(str(tmp_path / "lm"), device="cpu")
    ids = torch.randint(0, 100, (2, 9))
    expected = bridge.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", replace)])
    with splice(model, ours, skip_first=False):
        logits = model(ids).logits
    assert not torch.allclose(logits, model(ids).logits, atol=1e-3)  # the splice did something
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    # saved by us, SAELens reads it back as a hook_z SAE, which takes z per head
    ours.save(tmp_path / "ours")
    back = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"))
    assert back.cfg.reshape_activations == "hook_z"
    z = torch.randn(2, 9, 2, 16)
    torch.testing.assert_close(back(z), replace(z, None), atol=1e-5, rtol=1e-5)


# -- training losses ------------------------------------------------------------------------------
TRAINING = {  # SAELens's training class, and the coefficient its step takes (name, value)
    "standard": ("StandardTrainingSAE", ("l1", 0.7)),
    "topk": ("TopKTrainingSAE", None),
    "batchtopk": ("BatchTopKTrainingSAE", None),
    "matryoshka_batchtopk": ("MatryoshkaBatchTopKTrainingSAE", None),
    "jumprelu": ("JumpReLUTrainingSAE", ("l0", 0.7)),
    "gated": ("GatedTrainingSAE", ("l1", 0.7)),
}


@pytest.mark.parametrize("architecture", list(TRAINING))
def test_training_loss_and_gradients_match_saelens(architecture):
    """Same weights, same batch, same dead latents: every loss term SAELens's training step
    reports, under its name, and every gradient. Known departures (docs/decisions.md 35): the
    gated auxiliary loss trains no decoder (W_dec's and b_dec's gradients differ), and AuxK keeps
    only positive dead pre-activations (here the ones it picks are positive, so it matches)."""
    from sae_lens.saes.sae import TrainStepInput

    from sae.models import TrainContext

    torch.manual_seed(0)
    d_in, d_sae, k = 64, 512, 16
    x = torch.randn(256, d_in) * 2 + 0.3
    dead = torch.rand(d_sae) < 0.3
    ours = sae.create(architecture, d_in=d_in, d_sae=d_sae, k=k)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(torch.randn_like(p) * (1 if name == "W_dec" else 0.1))
        ours.W_dec /= ours.W_dec.norm(dim=1, keepdim=True)
        ours.W_enc.copy_(ours.W_dec.T * 0.5 + 0.05 * torch.randn(d_in, d_sae))
        if architecture == "jumprelu":
            ours.threshold.copy_(torch.rand(d_sae) * 0.5)
    cls, coefficient = TRAINING[architecture]
    fields = {}
    if coefficient is None:  # the top-k family: AuxK, and codes not rescaled by decoder norms
        fields = {"k": k, "aux_loss_coefficient": 1 / 32, "rescale_acts_by_decoder_norm": False}
    if architecture == "matryoshka_batchtopk":
        fields["matryoshka_widths"] = ours.widths
    theirs = getattr(sae_lens, cls)(
        getattr(sae_lens, cls + "Config")(d_in=d_in, d_sae=d_sae, **fields)
    )
    state = ours.state_dict()
    if "batchtopk" in architecture:  # the inference threshold, which training does not read
        state.pop("threshold")
        state["topk_threshold"] = theirs.topk_threshold
    theirs.load_state_dict(state)
    coefficients = dict([coefficient]) if coefficient else {}

    out = ours.training_loss(x, TrainContext(sparsity_coefficient=coefficient[1] if coefficient else 0.0,
                                             aux_coefficient=1 / 32, dead=dead))  # fmt: skip
    out.loss.backward()
    step = TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=dead,
                          n_training_steps=0, is_logging_step=False)  # fmt: skip
    reference = theirs.training_forward_pass(step)
    reference.loss.backward()

    assert set(out.parts) == set(reference.losses)
    for name, value in reference.losses.items():
        torch.testing.assert_close(out.parts[name], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-5, atol=1e-5)
    frozen_decoder = {"W_dec", "b_dec"} if architecture == "gated" else set()
    for name, p in ours.named_parameters():
        if name not in frozen_decoder and name != "threshold" or architecture == "jumprelu":
            q = dict(theirs.named_parameters())[name]
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)


TRANSCODER = {"hook_name": "blocks.6.mlp.hook_in", "hook_name_out": "blocks.6.hook_mlp_out",
              "d_out": 8, "apply_b_dec_to_input": False}  # fmt: skip
SAELENS_TRANSCODERS = {
    ("standard", False): "Transcoder",
    ("standard", True): "SkipTranscoder",
    ("jumprelu", False): "JumpReLUTranscoder",
    ("jumprelu", True): "JumpReLUSkipTranscoder",
    ("batchtopk", False): "JumpReLUTranscoder",  # inference: a JumpReLU, as for SAEs
    ("batchtopk", True): "JumpReLUSkipTranscoder",
}


def assert_same_predictions(ours, theirs):
    """Same codes (non-trivially sparse), decodes and predictions (skip path included)."""
    x = torch.randn(32, 12) * 3
    z = ours.encode(x)
    assert (z != 0).any() and (z == 0).any() and ours(x).shape == (32, 8)
    torch.testing.assert_close(theirs.encode(x), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.decode(z), ours.decode(z), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("architecture", "skip"), list(SAELENS_TRANSCODERS))
@pytest.mark.parametrize("normalized", [False, True])
@torch.no_grad()
def test_our_transcoders_load_in_saelens_transcoder_classes(
    tmp_path, architecture, skip, normalized
):
    """Input and output scales (0.6 and 1.7) fold into W_enc, W_dec, b_dec and W_skip on save."""
    extra = (
        {"normalize_activations": "expected_average_only_in", "norm_scaling_factor": 0.6,
         "norm_scaling_factor_out": 1.7} if normalized else {}
    )  # fmt: skip
    ours = make_sae(architecture, d_in=12, d_sae=40, k=4, skip=skip, **TRANSCODER, **extra)
    ours.save(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert type(theirs).__name__ == SAELENS_TRANSCODERS[architecture, skip]
    assert theirs.cfg.metadata.hook_name_out == "blocks.6.hook_mlp_out"
    assert_same_predictions(ours, theirs)
    again = sae.load(tmp_path)
    assert again.cfg.hook_name_out == "blocks.6.hook_mlp_out" and again.cfg.skip == skip
    assert_same_predictions(again, theirs)


@pytest.mark.parametrize("cls_name", sorted(set(SAELENS_TRANSCODERS.values())))
@torch.no_grad()
def test_saelens_transcoders_load_in_ours(tmp_path, cls_name):
    cfg = getattr(sae_lens, cls_name + "Config")(
        d_in=12, d_sae=40, d_out=8, apply_b_dec_to_input=False
    )
    cfg.metadata.hook_name = "blocks.3.mlp.hook_in"
    cfg.metadata.hook_name_out = "blocks.3.hook_mlp_out"
    theirs = saved_by_saelens(getattr(sae_lens, cls_name)(cfg), tmp_path)
    ours = sae.load(tmp_path)
    assert ours.cfg.hook_name_out == "blocks.3.hook_mlp_out" and ours.cfg.d_out == 8
    assert ours.cfg.skip == ("Skip" in cls_name) and ours.cfg.is_transcoder
    assert_same_predictions(ours, theirs)
