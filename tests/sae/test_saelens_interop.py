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


@pytest.mark.parametrize("architecture", list(SAELENS_CLASSES))
@torch.no_grad()
def test_saelens_saved_loads_in_ours_with_same_outputs(tmp_path, architecture):
    cls_name, cfg_name, extra = SAELENS_CLASSES[architecture]
    cfg = getattr(sae_lens, cfg_name)(d_in=12, d_sae=40, **extra)
    cfg.metadata.hook_name = "blocks.3.hook_resid_pre"
    cfg.metadata.model_name = "gpt2"
    theirs = getattr(sae_lens, cls_name)(cfg)
    torch.manual_seed(0)
    for p in theirs.parameters():
        p.copy_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.5))
    if architecture == "jumprelu":
        theirs.threshold.copy_(torch.rand_like(theirs.threshold) * 0.5)
    theirs.save_model(str(tmp_path))
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
