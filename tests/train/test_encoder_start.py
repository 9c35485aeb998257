"""The encoder's start: an SAE's tied encoder scaled by the least-squares fit of the first batch
(SAE.fit_code_scale), which the top-k rules get by default (encoder_init auto)."""

import json

import pytest
import torch

import train
from sae.config import SAEConfig
from sae.models import REGISTRY, SAE, TrainContext
from tests.conftest import write_cache
from tests.train.test_transcoders import IN, OUT, pair_cache, pairs
from train.config import TrainConfig
from train.trainer import Trainer


def heavy_rows(n: int = 4000, d: int = 32, seed: int = 0) -> torch.Tensor:
    """Rows whose norms spread as a residual stream's do (99th percentile ~5x the median, as on
    SmolLM2's layer 6): Gaussian directions times log-normal sizes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.randn(n, 1, generator=g).mul(0.7).exp()


def latents_part(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """What the latents add to the reconstruction (without b_dec), as training computes it."""
    with torch.no_grad():
        return sae.training_loss(x, TrainContext(aux_coefficient=0.0)).x_hat - sae.b_dec


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "matryoshka_batchtopk", "gated"])
def test_the_fitted_scale_is_the_least_squares_one_and_leaves_the_selection(architecture):
    torch.manual_seed(0)
    x = heavy_rows()
    sae = REGISTRY[architecture](SAEConfig(architecture=architecture, d_in=32, d_sae=256, k=4))
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    before = latents_part(sae, x)
    scale = sae.fit_code_scale(x)
    after = latents_part(sae, x)
    # the same latents fire, each code times the scale (b_enc is zero at the start)
    torch.testing.assert_close(after, scale * before, rtol=1e-4, atol=1e-4)
    residual = x - sae.b_dec - after
    assert (residual * after).sum().abs() < 1e-4 * after.pow(2).sum(), "orthogonal at the optimum"
    assert scale == pytest.approx(
        float(((x - sae.b_dec) * before).sum() / before.pow(2).sum()), rel=1e-5
    )
    assert explained_variance(x, after + sae.b_dec) >= explained_variance(x, before + sae.b_dec)


def test_batchtopk_starts_from_a_negative_fit_to_a_positive_one():
    """The rows of large norm take most of the batch's k * rows latents, hundreds each at the
    tied start, whose projections add up to far more than the row."""
    torch.manual_seed(0)
    x = heavy_rows()
    sae = REGISTRY["batchtopk"](SAEConfig(architecture="batchtopk", d_in=32, d_sae=1024, k=4))
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    assert explained_variance(x, latents_part(sae, x) + sae.b_dec) < 0
    assert 0 < sae.fit_code_scale(x) < 0.5
    assert explained_variance(x, latents_part(sae, x) + sae.b_dec) > 0.1


@pytest.mark.parametrize("architecture", ["jumprelu", "standard"])
def test_a_penalty_rule_s_fitted_start_has_each_latent_fire_on_k_of_d_sae_rows(architecture):
    """From threshold 0.01 (JumpReLU) or bias 0 (ReLU-L1) about half the latents fire on a row;
    the fitted start moves each latent's threshold or bias to where L0 is k (each latent firing
    on k / d_sae of the batch), then scales codes and thresholds or biases together."""
    torch.manual_seed(0)
    x = heavy_rows()  # 4000 rows
    sae = REGISTRY[architecture](SAEConfig(architecture=architecture, d_in=32, d_sae=256, k=4))
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    sae.start_training()
    assert (sae.encode(x) > 0).sum(-1).float().mean() > 100
    scale = sae.fit_code_scale(x)
    assert scale != 1.0
    fires = (sae.encode(x) > 0).sum(0)
    assert (fires == round(4000 * 4 / 256)).all()  # 62 rows each: L0 62 * 256 / 4000 = 3.97
    after = latents_part(sae, x)
    residual = x - sae.b_dec - after
    assert (residual * after).sum().abs() < 1e-4 * after.pow(2).sum(), "the scale is fitted"


def test_a_relu_l1_transcoder_starts_at_l0_k_from_its_zero_decoder():
    """With a zero decoder there is no scale to fit, but the biases still start the code at L0 k:
    from half the latents firing, a ReLU-L1 transcoder's first rows overshot the target sixfold
    and pulling them back killed 39% of its latents whatever the weight."""
    x, y = heavy_rows(), heavy_rows(d=64, seed=1)
    transcoder = REGISTRY["standard"](SAEConfig(architecture="standard", d_in=32, d_out=64,
        d_sae=256, k=4, hook_name="a", hook_name_out="b", apply_b_dec_to_input=False))  # fmt: skip
    with torch.no_grad():
        transcoder.W_dec.zero_()
    assert transcoder.fit_code_scale(x, y) == 1.0
    assert (transcoder.encode(x) > 0).sum(-1).float().mean() == pytest.approx(4, abs=0.05)


@pytest.mark.parametrize("silent", ["zero decoder", "nothing fires"])
@pytest.mark.parametrize("architecture", ["topk", "standard", "jumprelu"])
def test_a_silent_code_has_no_scale_to_fit(architecture, silent):
    """Also a normalized transcoder with its output bias set, whose prediction from a zero decoder
    (or from latents that do not fire), scaled back and forth, left rounding that the fit scaled
    the encoder by (JumpReLU and ReLU-L1 transcoders on SmolLM2's layer-6 MLP then diverged to
    explained variance -4e6)."""
    sae = REGISTRY[architecture](SAEConfig(architecture=architecture, d_in=32, d_sae=128, k=4))
    transcoder = REGISTRY[architecture](SAEConfig(
        architecture=architecture, d_in=32, d_out=64, d_sae=128, k=4, hook_name="a",
        hook_name_out="b", apply_b_dec_to_input=False, normalize_activations="expected_average_only_in",
        norm_scaling_factor=0.23, norm_scaling_factor_out=0.31))  # fmt: skip
    x = heavy_rows()
    y = heavy_rows(d=64, seed=1) * 3 + 1
    for dictionary, target in ((sae, None), (transcoder, y)):
        with torch.no_grad():
            if silent == "zero decoder":
                dictionary.W_dec.zero_()
            else:
                dictionary.W_enc.zero_()  # pre-activations b_enc: no latent fires, not even top-k's
                dictionary.b_enc.fill_(-1.0)
            dictionary.b_dec.copy_(dictionary.scale_target(y).mean(0) if target is not None else 0)
        dictionary.start_training()
        W_enc = dictionary.W_enc.clone()
        assert dictionary.fit_code_scale(x, target) == 1.0
        assert torch.equal(dictionary.W_enc, W_enc)


@pytest.mark.filterwarnings("ignore::UserWarning")  # tiny runs: short, L0 off k
def test_auto_fits_the_saes_measured_better_so(tmp_path, monkeypatch):
    """The top-k rules' SAEs, ReLU-L1's and JumpReLU's are fitted; Gated keeps the tied start
    (from the fitted one its L0 swung with the run's length and it fit worse at matched L0), as
    do transcoders (measured on their own starts) but JumpReLU's, whose thresholds then start at
    L0 k, and ReLU-L1's, whose biases then start at L0 k; `fitted` asks for it anywhere at one
    hookpoint."""
    fitted = []
    fit = SAE.fit_code_scale

    def record(self, x, y=None):
        fitted.append((self.cfg.architecture, self.cfg.is_transcoder))
        return fit(self, x, y)

    monkeypatch.setattr(SAE, "fit_code_scale", record)
    sweep = [{"architecture": a} for a in ("topk", "batchtopk", "matryoshka_batchtopk")]
    sweep += [{"architecture": "batchtopk", "encoder_init": "tied", "name": "tied"}]
    sweep += [{"architecture": a} for a in ("standard", "jumprelu", "gated")]
    sweep += [{"architecture": "gated", "encoder_init": "fitted", "name": "fitted"}]
    sweep += [{"architecture": "standard", "encoder_init": "tied", "name": "l1-tied"}]
    sweep += [{"architecture": a, "hook_out": OUT, "name": f"t-{a}"}
              for a in ("topk", "batchtopk", "jumprelu", "standard")]  # fmt: skip
    sweep += [{"architecture": "batchtopk", "hook_out": OUT, "encoder_init": "fitted",
               "name": "t-fitted"}]  # fmt: skip
    _, x, y = pairs(rows=4000)
    cache = pair_cache(tmp_path / "cache", x, y)
    train.fit(cache, hook=IN, sweep=sweep, d_sae=64, k=4, batch_size=1000, total_tokens=2000,
              out=str(tmp_path / "run"))  # fmt: skip
    assert fitted == [("topk", False), ("batchtopk", False), ("matryoshka_batchtopk", False),
                      ("standard", False), ("jumprelu", False), ("gated", False),
                      ("jumprelu", True), ("standard", True), ("batchtopk", True)]  # fmt: skip


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_batchtopk_trains_from_the_fitted_start_at_once(tmp_path):
    """The first step's explained variance (logged before the update) is the start's: negative
    from the tied start on rows of spread norms, positive from the fitted one."""
    x = heavy_rows(8000)
    cache = write_cache(tmp_path / "cache", ({IN: part} for part in x.split(2000)))
    sweep = [{"encoder_init": start, "name": start} for start in ("tied", "auto")]
    train.fit(cache, architecture="batchtopk", sweep=sweep, d_sae=1024, k=4, batch_size=2000,
              total_tokens=4000, out=str(tmp_path / "run"))  # fmt: skip
    step = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert step["metrics/explained_variance/tied"] < 0 < step["metrics/explained_variance/auto"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"encoder_init": "scaled"}, "encoder_init 'scaled' is not one of auto, tied, fitted"),
        ({"encoder_init": "fitted", "layers": "0-1", "hook": "hook_resid_post"},
         r"encoder_init fitted starts an SAE, a transcoder or a cross-layer transcoder, not a "
         r"crosscoder \(over '0-1'\)"),
    ],
)  # fmt: skip
def test_an_unknown_or_unfittable_encoder_start_is_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_zero_b_dec_gathers_the_first_batch_only_for_a_fit(tmp_path, monkeypatch):
    """b_dec_init zeros leaves b_dec at zero; the first batch is gathered over the ranks only
    for a member whose encoder scale is fitted (TopK), not for one with nothing to take (Gated)."""
    x = heavy_rows(4000)
    cache = write_cache(tmp_path / "cache", ({IN: part} for part in x.split(2000)))
    sweep = [{"architecture": "gated", "name": "l0"}, {"architecture": "topk", "name": "topk"}]
    cfg = TrainConfig(out=str(tmp_path / "run"), hook=IN, sweep=sweep, d_sae=64, k=4,
                      batch_size=2000, total_tokens=4000, b_dec_init="zeros")  # fmt: skip
    trainer = Trainer(cfg, cache)
    gathered = []
    gather = trainer.world.gather
    monkeypatch.setattr(trainer.world, "gather", lambda t: gathered.append(t) or gather(t))
    W_enc = {m.name: m.sae.W_enc.clone() for m in trainer.members}
    trainer.start_members(next(iter(trainer.source)))
    assert len(gathered) == 1
    for m in trainer.members:
        assert not m.sae.b_dec.any()
    l0, topk = trainer.members
    assert torch.equal(l0.sae.W_enc, W_enc["l0"])
    assert not torch.allclose(topk.sae.W_enc, W_enc["topk"])
