"""Crosscoders: one dictionary over several hookpoints. Its loss is its rule's on the scaled
concatenation, its files fold every hookpoint's scale, training finds features shared across
layers (one latent each, a direction per layer), and `sae eval` replaces every layer it reads."""

import json

import pytest
import torch
from torch.nn.functional import normalize

import sae
import train
from sae.cli import main
from sae.config import ConfigError
from sae.crosscoder import Crosscoder, CrosscoderConfig
from sae.export import export
from sae.models import TrainContext
from tests.conftest import write_cache

D, F, N = 8, 24, 3
HOOKS = [f"blocks.{i}.hook_resid_post" for i in (2, 4, 6)]


def make_crosscoder(architecture="topk", seed=0, **fields):
    torch.manual_seed(seed)
    c = Crosscoder(CrosscoderConfig(architecture=architecture, hook_names=HOOKS, d_in=D, d_sae=F,
                                    k=3, **fields))  # fmt: skip
    with torch.no_grad():
        for name, t in c.state_dict().items():
            t.copy_(
                torch.rand_like(t) * 0.2
                if name.endswith("threshold")
                else torch.randn_like(t) * 0.5
            )
    return c


SCALED = {
    "normalize_activations": "expected_average_only_in",
    "norm_scaling_factors": [0.5, 2.0, 1.3],
}


@pytest.mark.parametrize("architecture", ["topk", "standard", "jumprelu", "matryoshka_batchtopk"])
def test_the_loss_is_the_rules_own_on_the_scaled_concatenation(architecture):
    c = make_crosscoder(architecture, **SCALED)
    x = torch.randn(64, N * D)
    s = torch.tensor([0.5, 2.0, 1.3]).repeat_interleave(D)
    ctx = TrainContext(sparsity_coefficient=0.2, dead=torch.rand(F) < 0.3)
    out = c.training_loss(x, ctx)
    direct = c.sae.training_loss(x * s, ctx)
    for name in direct.parts:
        torch.testing.assert_close(out.parts[name], direct.parts[name])
    torch.testing.assert_close(out.x_hat, direct.x_hat / s)
    with torch.no_grad():
        torch.testing.assert_close(c(x), c.sae(x * s) / s)


@pytest.mark.parametrize("architecture", ["topk", "gated", "batchtopk"])
@torch.no_grad()
def test_saved_files_fold_every_hookpoints_scale(tmp_path, architecture):
    c = make_crosscoder(architecture, **SCALED)
    x = torch.randn(20, N * D) * 2
    c.save(tmp_path / "xc")
    back = sae.load(tmp_path / "xc")
    assert isinstance(back, Crosscoder) and back.cfg.norm_scaling_factors == [1.0] * N
    torch.testing.assert_close(back(x), c(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back.encode(x), c.encode(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no layout for a crosscoder"):
        export(tmp_path / "xc", "circuit-tracer", tmp_path / "out")


def test_what_is_not_a_crosscoder_is_refused():
    with pytest.raises(ConfigError, match="two or more distinct hookpoints"):
        CrosscoderConfig(hook_names=HOOKS[:1])
    with pytest.raises(ConfigError, match="two or more distinct hookpoints"):
        CrosscoderConfig(hook_names=[HOOKS[0], HOOKS[0]])
    with pytest.raises(ConfigError, match="unknown architecture"):
        CrosscoderConfig(hook_names=HOOKS, architecture="dense")
    with pytest.raises(ValueError, match=r"last dimension 3 \* 8 = 24; got \(5, 8\)"):
        make_crosscoder()(torch.randn(5, D))


def test_a_crosscoder_finds_the_features_shared_across_layers(tmp_path):
    """x_i = c @ E_i: the same sparse codes at every layer, a direction per layer. One latent per
    feature holds all three of its directions."""
    g = torch.Generator().manual_seed(0)
    E = normalize(torch.randn(N, 32, D * 4, generator=g), dim=-1)
    codes = (torch.rand(30_000, 32, generator=g) < 0.08) * (
        0.5 + torch.rand(30_000, 32, generator=g)
    )
    xs = [codes @ E[i] for i in range(N)]
    shards = (
        {h: x[s : s + 3000] for h, x in zip(HOOKS, xs, strict=True)} for s in range(0, 30_000, 3000)
    )
    cache = write_cache(tmp_path / "cache", shards)
    c = train.fit(cache.url, layers="2,4,6", hook="hook_resid_post", architecture="topk", d_sae=64, k=4,
                  total_tokens=300_000, batch_size=1000, warmup_steps=10, lr=1e-2, out=str(tmp_path / "run"))  # fmt: skip
    assert isinstance(c, Crosscoder) and c.cfg.hook_names == HOOKS
    x = torch.cat(xs, -1)
    with torch.no_grad():
        ev = 1 - (c(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        blocks = normalize(c.sae.W_dec.unflatten(-1, (N, D * 4)), dim=-1)  # [F, layer, d]
        cos = torch.einsum("fld,lgd->lfg", blocks, E)  # per layer: latent x true feature
    assert ev > 0.9, float(ev)
    best = cos.mean(0).argmax(0)  # each true feature's latent, by its mean cosine over layers
    per_layer = cos[:, best, torch.arange(32)]  # [layer, feature]: the same latent at every layer
    assert per_layer.mean() > 0.9, per_layer.mean(1)
    assert (
        tmp_path / "run" / "crosscoder-L2_4_6-topk-k4-x64-hook_resid_post" / "cfg.json"
    ).exists()


def test_sae_eval_replaces_every_layer_of_a_crosscoder(tmp_path, smollm2):
    torch.manual_seed(0)
    c = Crosscoder(
        CrosscoderConfig(hook_names=HOOKS, d_in=576, d_sae=64, k=8, model_name="smollm2-135m")
    )
    c.save(tmp_path / "xc")

    def scored(folder):
        out = tmp_path / f"{folder}.json"
        main(["eval", str(tmp_path / folder), "--tokens", "126", "--context-size", "64",
              "--json", str(out)])  # fmt: skip
        return json.loads(out.read_text())

    report = scored("xc")
    assert [layer["hook_name_out"] for layer in report["layers"]] == HOOKS
    assert report["meta"]["dictionary"] == "crosscoder" and report["l0"] == pytest.approx(8)
    assert report["ce_replacement_with_errors"] == pytest.approx(report["ce_clean"], abs=1e-5)
    assert report["ce_clean"] < report["ce_replacement"]
    with torch.no_grad():
        c.sae.W_dec.zero_()
        c.sae.b_dec.zero_()
    c.save(tmp_path / "nothing")
    report = scored("nothing")
    assert report["ce_replacement"] == pytest.approx(report["ce_zero_ablation"], rel=1e-5)
