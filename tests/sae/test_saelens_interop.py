"""Round trips through the real sae_lens package: ours -> SAELens and SAELens -> ours."""

import pytest
import torch

import sae
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
